"""Errors of distillation merging."""

from modelalloy.errors import ModelAlloyError


class DistillError(ModelAlloyError):
    """Teachers, student or data cannot be distilled together (one line: what and where)."""
