"""The options every training stage shares (TrainConfig) and their validation before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from upstack.checkpoint import normalize_dtype
from upstack.config import config_from_dict
from upstack.data.loading import DataSpec, parse_data_spec
from upstack.errors import ConfigError, UpstackError
from upstack.train.layers import parse_train_layers
from upstack.train.lora import lora_problems
from upstack.train.metrics import tracker_problems

DTYPES = ("fp32", "bf16", "bf16-mixed")
_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "f32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                  "bf16-mixed": "bf16-mixed", "mixed": "bf16-mixed"}
LR_SCHEDULERS = ("cosine", "linear", "constant")

DataList = list[Union[str, dict[str, Any]]]


@dataclass
class TrainConfig:
    """Options every stage shares (CLI flags and recipe YAML fill the same fields)."""

    model: str                                  # HF checkpoint folder (or hub id when online)
    data: DataList                              # data specs: "file.jsonl:format=alpaca,samples=100" or mappings
    out: str                                    # output checkpoint folder
    eval_data: DataList = field(default_factory=list)
    eval_fraction: float = 0.0                  # share of the training items held out for eval
    learning_rate: float = 2e-5
    lr_scheduler: str = "cosine"                # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0                   # used when warmup_steps is 0
    min_lr_ratio: float = 0.0                   # the schedule ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0                  # 0 disables clipping
    batch_size: int = 8                         # per process, per micro-batch
    grad_accum: int = 1
    max_steps: Optional[int] = None             # optimizer steps; None: from epochs
    epochs: float = 1.0
    max_length: int = 2048                      # tokens per sequence (pretrain: the block length)
    seed: int = 0
    dtype: str = "fp32"                         # fp32 | bf16 (bf16 weights) | bf16-mixed (fp32 weights, bf16 autocast)
    save_dtype: Optional[str] = None            # dtype of the saved model; None: the input checkpoint's
    gradient_checkpointing: bool = False
    attn_implementation: Optional[str] = None   # sdpa | eager | flash_attention_2 ...; None: transformers' default
    pad_to_multiple_of: Optional[int] = None    # batch widths rounded up; None: 64 on CUDA, 1 elsewhere
    train_layers: Union[str, list[int]] = "all"  # all | new | "0-3,8" | [0, 1, 2]
    lora: bool = False                          # train LoRA adapters instead of the full model
    qlora: bool = False                         # LoRA on a base loaded in 4-bit NF4 (bitsandbytes)
    lora_r: int = 16
    lora_alpha: Optional[float] = None          # None: 2 x lora_r
    lora_dropout: float = 0.05
    lora_targets: Union[str, list[str]] = "all-linear"  # all-linear, or module names: "q_proj,v_proj"
    lora_modules_to_save: Union[str, list[str], None] = None  # trained whole, e.g. "embed_tokens,lm_head"
    use_rslora: bool = False                    # scale alpha / sqrt(r) (rank-stabilised LoRA)
    use_dora: bool = False                      # weight-decomposed LoRA (magnitude + direction)
    adapter_only: bool = False                  # write only OUT/adapter (no merged checkpoint)
    save_steps: int = 500                       # resumable checkpoint every N steps (0: only on Ctrl-C)
    save_total_limit: int = 2                   # resumable checkpoints kept
    eval_steps: int = 0                         # eval every N steps (0: at the end only)
    eval_at_start: bool = False                 # also eval the starting model (step 0: a curve's first point)
    logging_steps: int = 10
    skip_bad_rows: bool = False
    resume: bool = False
    overwrite: bool = False
    keep_checkpoints: bool = False              # keep <out>.work after success
    tensorboard: bool = True
    report_to: Union[str, list[str]] = "tensorboard"  # tensorboard, wandb, mlflow, trackio (comma list) or none
    progress: bool = True


def check_config(cfg: TrainConfig) -> None:
    """Validate options that do not need the model or data (fail before work)."""
    problems = []
    if not cfg.data:
        problems.append("data: give at least one data source")
    positive = {"learning_rate": cfg.learning_rate, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "epochs": cfg.epochs}
    problems += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if not v > 0]
    if cfg.max_length < 2:
        problems.append(f"max_length: must be at least 2, got {cfg.max_length}")
    if cfg.max_steps is not None and cfg.max_steps < 0:
        problems.append(f"max_steps: must be >= 0, got {cfg.max_steps}")
    for name in ("warmup_steps", "save_steps", "eval_steps", "save_total_limit"):
        if getattr(cfg, name) < 0:
            problems.append(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.logging_steps < 1:
        problems.append(f"logging_steps: must be >= 1, got {cfg.logging_steps}")
    if cfg.pad_to_multiple_of is not None and cfg.pad_to_multiple_of < 1:
        problems.append(f"pad_to_multiple_of: must be >= 1, got {cfg.pad_to_multiple_of}")
    for name in ("warmup_ratio", "min_lr_ratio"):
        if not 0 <= getattr(cfg, name) <= 1:
            problems.append(f"{name}: must be between 0 and 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.eval_fraction < 1:
        problems.append(f"eval_fraction: must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.eval_fraction and cfg.eval_data:
        problems.append("give eval_data or eval_fraction, not both")
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"lr_scheduler: {cfg.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    if cfg.max_grad_norm < 0 or cfg.weight_decay < 0:
        problems.append("max_grad_norm and weight_decay must be >= 0")
    if str(cfg.dtype).lower() not in _DTYPE_ALIASES:
        problems.append(f"dtype: {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    if cfg.save_dtype is not None:
        try:
            normalize_dtype(cfg.save_dtype)
        except UpstackError as e:
            problems.append(f"save_dtype: {e}")
    problems += lora_problems(cfg, _DTYPE_ALIASES.get(str(cfg.dtype).lower()))
    problems += tracker_problems(cfg.report_to)
    if problems:
        raise ConfigError("; ".join(problems))
    cfg.dtype = _DTYPE_ALIASES[str(cfg.dtype).lower()]
    parse_train_layers(cfg.train_layers, None)  # syntax only; indices are checked against the model later


def master_dtype(cfg: TrainConfig) -> str:
    """The dtype the weights are loaded in: fp32 master weights unless dtype == 'bf16'. With --lora under
    bf16-mixed the base is frozen, so it needs no fp32 master copy: it is held in bf16 (what it computes in
    under autocast anyway) and only the trained adapters keep fp32 weights (train/lora.apply_lora)."""
    if cfg.dtype == "bf16" or (cfg.dtype == "bf16-mixed" and (cfg.lora or cfg.qlora)):
        return "bfloat16"
    return "float32"


def data_specs(items: DataList, where: str = "data") -> list:
    """Spec strings and mappings -> DataSpec objects (the data layer's parser and validation)."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(parse_data_spec(item))
        elif isinstance(item, DataSpec):
            out.append(item)
        else:
            out.append(config_from_dict(DataSpec, item, f"{where}[{i}]"))
    return out


def train_and_eval_specs(cfg: TrainConfig) -> tuple[list, list]:
    """(--data, --eval-data) as DataSpec lists, validated before the run starts."""
    return data_specs(cfg.data), data_specs(cfg.eval_data, "eval_data")
