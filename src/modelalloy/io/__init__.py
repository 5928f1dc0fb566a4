"""Checkpoints in and out: lazy validated reads, atomic sharded writes, config/tokenizer copy."""

from modelalloy.io.atomic_dir import AtomicOutputDir, LeftoverNotice, recover_leftovers
from modelalloy.io.checkpoint import Checkpoint, TensorInfo, open_checkpoint, read_state_dict
from modelalloy.io.dtypes import dtype_name, parse_dtype
from modelalloy.io.model_files import copy_model_files, set_config_dtype, write_model_card
from modelalloy.io.writer import (
    ShardedSafetensorsWriter,
    check_output_path,
    parse_size,
)

__all__ = [
    "AtomicOutputDir",
    "Checkpoint",
    "LeftoverNotice",
    "ShardedSafetensorsWriter",
    "TensorInfo",
    "check_output_path",
    "copy_model_files",
    "dtype_name",
    "open_checkpoint",
    "parse_dtype",
    "parse_size",
    "read_state_dict",
    "recover_leftovers",
    "set_config_dtype",
    "write_model_card",
]
