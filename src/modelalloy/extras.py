"""Which optional extra provides a missing module, read from the installed package's metadata.

A core install (`pip install modelalloy`) lacks transformers, scikit-learn, lm-eval, numba...;
a command that needs one should say in one line which extra to install rather than show a
traceback. The extras and their requirements come from the package metadata (pyproject's
`[project.optional-dependencies]`), so this module never repeats that list.
"""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata

from modelalloy.errors import ModelAlloyError

# Import names that differ from their distribution's name.
_DISTRIBUTION_OF_MODULE = {"sklearn": "scikit-learn", "yaml": "pyyaml", "cv2": "opencv-python"}
# Extras for developers, never the one to suggest to a user.
_NOT_SUGGESTED = {"test"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> list[tuple[str, str]]:
    """(distribution, extra) for every requirement of an extra in the installed metadata."""
    try:
        requirements = metadata.requires("modelalloy") or []
    except metadata.PackageNotFoundError:  # running from a source tree without metadata
        return []
    pairs = []
    for requirement in requirements:
        marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        name = re.match(r"\s*([A-Za-z0-9_.\-]+)", requirement)
        if marker and name:
            pairs.append((_normalise(name.group(1)), marker.group(1)))
    return pairs


def _module_of(distribution: str) -> str:
    aliases = {_normalise(d): m for m, d in _DISTRIBUTION_OF_MODULE.items()}
    return aliases.get(distribution, distribution.replace("-", "_"))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses the name outright
        return False


def require_extra(extra: str, command: str) -> None:
    """Raise a one-line error naming `extra` when any of its packages cannot be imported.

    Commands call this first, so a core install learns everything it lacks at once, before
    any work, rather than one missing module per attempt.
    """
    missing = [d for d, e in _requirements() if e == extra and d != "modelalloy"
               and not _importable(_module_of(d))]
    if missing:
        raise ModelAlloyError(
            f"'modelalloy {command}' needs the optional packages {', '.join(missing)}, which "
            f"are not installed: pip install 'modelalloy[{extra}]'")


def extras_providing(module: str) -> list[str]:
    """Names of the extras whose requirements include the distribution of `module`."""
    top = module.split(".")[0]
    wanted = _normalise(_DISTRIBUTION_OF_MODULE.get(top, top))
    found: list[str] = []
    for distribution, extra in _requirements():
        if distribution == wanted and extra not in _NOT_SUGGESTED and extra not in found:
            found.append(extra)
    return found


def missing_extra_message(module: str, command: str | None) -> str | None:
    """One line naming the extra to install for `module`, or None if no extra provides it.

    The extra named like the command wins (`bench` -> `[bench]`); otherwise the first extra
    that lists the module, in pyproject's order.
    """
    extras = extras_providing(module)
    if not extras:
        return None
    extra = command if command in extras else extras[0]
    where = f"'modelalloy {command}'" if command else "this feature"
    return (f"{where} needs the optional package '{module.split('.')[0]}', which is not "
            f"installed: pip install 'modelalloy[{extra}]'")
