"""Checks of option values shared by commands: one-line errors naming the option."""

from __future__ import annotations

import re
from collections.abc import Iterable

from modelalloy.errors import ModelAlloyError


def regex_option(option: str, patterns: Iterable[str] | str | None) -> None:
    """Refuse a pattern Python's ``re`` cannot compile, naming the option and the pattern."""
    for pattern in [patterns] if isinstance(patterns, str) else patterns or []:
        try:
            re.compile(pattern)
        except re.error as err:
            raise ModelAlloyError(f"{option} {pattern!r}: not a regular expression ({err})"
                                  ) from None


def device_option(option: str, device: str) -> None:
    """Refuse a device torch does not know or this machine lacks, naming the option."""
    from modelalloy.engine.run import resolve_device

    try:
        resolve_device(device)
    except ModelAlloyError as err:
        raise ModelAlloyError(f"{option} {device}: {str(err).split(': ', 1)[1]}") from None
