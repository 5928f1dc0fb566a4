"""Errors meant for people: one line naming the file or tensor and what to do.

Every error the CLI shows without a traceback derives from :class:`ModelAlloyError`.
Anything else escaping is a bug and is shown with its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ModelAlloyError(Exception):
    """Base class: ``str(err)`` is a one-line message that says what, where and what to do.

    A message whose remedy is an argument of the call spells it as the Python API does,
    ``name=value`` (``force=True``, ``memory_budget='2GB'``), and lists ``name`` in
    ``options``. The command line, whose flags are these names with dashes, shows the same line
    with its flags instead (``--force``, ``--memory-budget 2GB``: ``cli_message`` in
    commands/_console.py), so the library never speaks of flags an API caller does not have.
    """

    def __init__(self, *args: object, options: tuple[str, ...] = ()) -> None:
        super().__init__(*args)
        self.options = options


class CheckpointError(ModelAlloyError):
    """A model folder or weight file is missing, corrupt, unsafe or inconsistent."""


class RecipeError(ModelAlloyError):
    """A recipe is invalid: names the field and how to fix it."""


class PlanError(ModelAlloyError):
    """Models do not fit together (missing tensors, shape or architecture mismatch)."""


class MethodError(ModelAlloyError):
    """Unknown method, bad parameter value, wrong model count, or a missing base model."""


class OutputError(ModelAlloyError):
    """The output path cannot be used (exists, is a file, not writable, is an input)."""


class NonFiniteError(ModelAlloyError):
    """NaN or Inf found in an input tensor."""


class OptimizeError(ModelAlloyError):
    """A search or learner cannot run: unknown algorithm or objective, nothing to search, an
    objective that fails on a candidate, an unreachable Ray cluster."""


class AdapterError(CheckpointError):
    """A LoRA adapter is unreadable, of an unsupported kind, or does not fit its model."""


def did_you_mean(word: object, options: Iterable[str]) -> str | None:
    """``"did you mean 'x'?"`` for the option closest to a mistyped ``word``, or None."""
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.5)
    return f"did you mean '{match[0]}'?" if match else None
