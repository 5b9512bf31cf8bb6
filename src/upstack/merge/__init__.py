"""Merge fine-tuned variants of one model: linear/average, SLERP, task arithmetic, TIES, DARE.

SOLAR-10.7B-Instruct is a merge (arXiv 2312.15166, sec. 4.3): weighted averages (0.5/0.5, 0.4/0.6,
0.6/0.4) and SLERP of DPO models that are strong at different tasks. The merge methods here follow
mergekit's conventions (its YAML config format included), so a mergekit config runs unchanged.

Plan, then stream: `merge` (stage.py) checks the models against each other (compat.py), resolves
every parameter for every tensor (settings.py, plan.py), and builds one `TensorPlan` per output tensor;
checkpoint's writer (the same as `upstack upscale`) validates the plan and writes atomically. A plan's
`compute` streams its tensor in chunks from a background thread (streaming.py); each chunk is
computed in BLOCK-element blocks, in fp32 (kernels.py, blocks.py), by the method's block kernel
(methods/: one file per method). Methods that need whole-tensor statistics make extra passes first:
  slerp  one pass for the dot product and both norms, then interpolates block by block;
  ties   an exact top-k by magnitude without holding the tensor: two histogram passes over the fp32
         bit patterns of |delta| (radix select on the high, then the low 16 bits) find the k-th
         largest magnitude; entries above it are kept, and entries equal to it in flat index order
         until exactly k are kept (the order a stable descending sort gives).
  dare   no statistics: the keep mask of element i of a tensor depends only on (seed, tensor name,
         model index, i), drawn in fixed BLOCK-aligned blocks, so chunking never changes the bytes.

`merge_adapter` (adapter.py) merges a PEFT LoRA adapter into its base through checkpoint's adapter plan.

The pure tensor functions (`linear`, `slerp`, `task_arithmetic`, `ties`, `dare`; functions.py) run the
same block kernels on in-memory tensors, so library users and tests get exactly what the command writes.
"""

from upstack.merge import blocks, kernels, streaming
from upstack.merge.adapter import MergeAdapterConfig, merge_adapter
from upstack.merge.blocks import BLOCK, Scratch
from upstack.merge.functions import dare, linear, slerp, task_arithmetic, ties
from upstack.merge.kernels import compute_chunks
from upstack.merge.methods import ALIASES, METHODS, canonical_method
from upstack.merge.methods.dare import dare_keep_mask, dare_seed
from upstack.merge.methods.slerp import (
    SLERP_DOT_THRESHOLD,
    SLERP_EPS,
    slerp_coefficients,
)
from upstack.merge.recipe import TensorRecipe
from upstack.merge.settings import (
    BOOL_PARAMS,
    MergeConfig,
    ModelEntry,
    check_setting,
    config_from_yaml,
    evaluate_setting,
    normalize_config_dict,
    tensor_depth,
    validate_config,
)
from upstack.merge.spec import REQUIRED, MethodSpec
from upstack.merge.stage import FLOAT_DTYPES, merge
from upstack.merge.streaming import CHUNK_BYTES, chunk_elements, default_workers
from upstack.merge.summary import (
    format_param,
    merge_model_card,
    resolved_config,
    summarize_groups,
    tensor_group,
)

__all__ = [
    "ALIASES", "BLOCK", "CHUNK_BYTES", "BOOL_PARAMS", "FLOAT_DTYPES", "METHODS", "REQUIRED", "SLERP_DOT_THRESHOLD", "SLERP_EPS",
    "MergeAdapterConfig", "MergeConfig", "MethodSpec", "ModelEntry", "Scratch", "TensorRecipe", "blocks", "canonical_method",
    "check_setting", "chunk_elements", "compute_chunks", "config_from_yaml", "dare", "dare_keep_mask",
    "dare_seed", "default_workers", "evaluate_setting", "format_param", "kernels", "linear", "merge", "merge_adapter",
    "merge_model_card", "normalize_config_dict", "resolved_config", "slerp", "slerp_coefficients",
    "streaming", "summarize_groups", "task_arithmetic", "tensor_depth", "tensor_group", "ties",
    "validate_config",
]
