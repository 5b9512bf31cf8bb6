"""Hugging Face checkpoint folders: every byte read (strict headers, the one path/symlink/pickle gate,
block reads), tensor plans and the one streaming sharded writer, inspect/verify, and the shared end of
a surgery stage.

Modules: dtypes (safetensors dtype names), reader (open_checkpoint, TensorRef, byte reads), blocks
(block-wise reads for the streaming merge), tokenizer_files (comparing two folders' tokenizers),
writer (TensorPlan, write_checkpoint), adapter (a PEFT LoRA adapter merged into a base as a tensor
plan), adapter_config (an adapter folder's gate, a LoRA config's values, bounded pattern matching), finish (write_surgery_output), verify (inspect/verify).
"""

from upstack.checkpoint.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Adapter,
    adapter_summary,
    merge_threads,
    open_adapter,
    plan_adapter_merge,
)
from upstack.checkpoint.adapter_config import check_adapter_folder
from upstack.checkpoint.blocks import TensorBlockReader
from upstack.checkpoint.dtypes import (
    DTYPE_ALIASES,
    DTYPE_SIZES,
    TORCH_DTYPE_NAMES,
    normalize_dtype,
)
from upstack.checkpoint.finish import (
    check_surgery_output,
    model_card_front_matter,
    set_config_dtype,
    write_surgery_output,
)
from upstack.checkpoint.reader import (
    AUX_FILE_PATTERNS,
    MAX_HEADER_BYTES,
    Checkpoint,
    TensorRef,
    aux_files,
    check_tokenizer_folder,
    checked_file,
    load_tensor,
    open_checkpoint,
    read_config,
    read_index,
    read_safetensors_header,
    read_tensor_bytes,
    resolve_model_dir,
    tensor_to_bytes,
)
from upstack.checkpoint.tokenizer_files import check_same_tokenizer_files, token_table
from upstack.checkpoint.verify import inspect_checkpoint, meta_model, verify_checkpoint
from upstack.checkpoint.writer import (
    TensorPlan,
    assign_shards,
    cast_plan,
    copy_aux_files,
    source_plan,
    validate_plan,
    write_checkpoint,
    write_shards,
)

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "Adapter", "adapter_summary", "open_adapter", "merge_threads", "plan_adapter_merge",
    "check_adapter_folder", "check_tokenizer_folder", "AUX_FILE_PATTERNS", "DTYPE_ALIASES", "DTYPE_SIZES", "MAX_HEADER_BYTES", "TORCH_DTYPE_NAMES", "Checkpoint",
    "TensorBlockReader", "TensorPlan", "TensorRef", "assign_shards", "aux_files", "checked_file", "check_same_tokenizer_files",
    "cast_plan", "check_surgery_output", "copy_aux_files", "inspect_checkpoint", "load_tensor", "meta_model", "model_card_front_matter",
    "normalize_dtype", "open_checkpoint", "read_config", "read_index", "read_safetensors_header",
    "read_tensor_bytes", "resolve_model_dir", "set_config_dtype", "source_plan", "tensor_to_bytes", "token_table",
    "validate_plan", "verify_checkpoint", "write_checkpoint", "write_shards", "write_surgery_output",
]
