"""Merge methods: one module per family; importing this package registers them all."""

import importlib
import pkgutil

from modelalloy.methods.registry import (
    Execution,
    Finish,
    FusedKernel,
    MergeContext,
    MethodSpec,
    Param,
    Prepare,
    TensorGroup,
    get_method,
    list_methods,
    register_method,
)

# Every module in this package registers its methods on import; new families need no edit here.
for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in {"registry"} and not _mod.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["Execution", "Finish", "FusedKernel", "MergeContext", "MethodSpec", "Param",
           "Prepare", "TensorGroup", "get_method", "list_methods", "register_method"]
