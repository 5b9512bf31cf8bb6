"""What the three training stages share: config, run folder, model loading, layer freezing, the loop.

One loop serves pretrain, sft and dpo. A stage turns its data into *items* (packed blocks, encoded
chats, preference pairs) and hands the loop a `collate(item_indices) -> micro-batch` and a
`loss_fn(model, batch) -> (summed loss, summed statistics)`. The loop owns the rest:

- data order: one seeded permutation of the items per epoch, read as a continuous stream in global
  batches of batch_size x grad_accum x processes; micro-batch k of process r is the (k * processes + r)-th
  slice, so 1 process x accumulation 2 sees exactly the batches of 2 processes x accumulation 1;
- loss normalisation over the whole global batch (label tokens, or pairs for DPO), counted before the
  backward pass, so the gradient does not depend on how the batch is split;
- warmup + cosine (or linear/constant) learning rate, set on the optimizer at every step;
- resumable state in `<out>.work/checkpoint-<step>/` (accelerate's save_state: model, optimizer, RNG;
  plus our trainer_state.json), written atomically; Ctrl-C/SIGTERM save one before exiting;
- metrics.jsonl (+ TensorBoard) and a progress bar; the final checkpoint written atomically to `out`.

accelerate supplies devices and DDP/FSDP/DeepSpeed; nothing here assumes one process or a CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

from upstack.checkpoint import TORCH_DTYPE_NAMES, normalize_dtype
from upstack.config import config_from_dict, config_to_dict
from upstack.errors import CheckpointError, ConfigError, OutputExistsError, UpstackError
from upstack.lm import check_model_path, forward_scored, read_upstack_json, to_device
from upstack.outputs import atomic_output_dir, check_output_free

log = logging.getLogger("upstack.train")

DTYPES = ("fp32", "bf16", "bf16-mixed")
_DTYPE_ALIASES = {"fp32": "fp32", "float32": "fp32", "f32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                  "bf16-mixed": "bf16-mixed", "mixed": "bf16-mixed"}
LR_SCHEDULERS = ("cosine", "linear", "constant")
# Options that may change between a run and its --resume (they do not change what is trained).
RESUME_FREE = {"resume", "overwrite", "progress", "save_steps", "save_total_limit", "logging_steps",
               "tensorboard", "keep_checkpoints", "eval_steps"}
# Testing hook: "STEP:KILL" or "STEP:INT" sends that signal to this process right after STEP completes
# (and its checkpoint, if any, is saved) -- how the tests crash and interrupt a real run.
TEST_SIGNAL_ENV = "UPSTACK_TEST_SIGNAL_AT_STEP"

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
    save_steps: int = 500                       # resumable checkpoint every N steps (0: only on Ctrl-C)
    save_total_limit: int = 2                   # resumable checkpoints kept
    eval_steps: int = 0                         # eval every N steps (0: at the end only)
    logging_steps: int = 10
    skip_bad_rows: bool = False
    resume: bool = False
    overwrite: bool = False
    keep_checkpoints: bool = False              # keep <out>.work after success
    tensorboard: bool = True
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
    if problems:
        raise ConfigError("; ".join(problems))
    cfg.dtype = _DTYPE_ALIASES[str(cfg.dtype).lower()]
    parse_train_layers(cfg.train_layers, None)  # syntax only; indices are checked against the model later


def data_specs(items: DataList, where: str = "data") -> list:
    """Spec strings and mappings -> DataSpec objects (the data layer's parser and validation)."""
    from upstack.data.loading import DataSpec, parse_data_spec

    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(parse_data_spec(item))
        elif isinstance(item, DataSpec):
            out.append(item)
        else:
            out.append(config_from_dict(DataSpec, item, f"{where}[{i}]"))
    return out


# ------------------------------------------------------------------------------------------------
# Layers to train

def parse_train_layers(spec: Union[str, list[int]], n_layers: Optional[int]) -> Optional[list[int]] | str:
    """'all' -> None (everything trains); 'new' -> 'new'; '0-3,8' or [0, 1] -> sorted layer indices."""
    if isinstance(spec, list):
        layers = [int(x) for x in spec]
    else:
        text = spec.strip().lower()
        if text == "all":
            return None
        if text == "new":
            return "new"
        layers = []
        for part in text.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise ConfigError(f"train_layers: cannot read {part.strip()!r} in {spec!r} "
                                  "(use all, new, or indices and ranges like 0-3,8)")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b < a:
                raise ConfigError(f"train_layers: range {part.strip()!r} runs backwards")
            layers.extend(range(a, b + 1))
    if not layers:
        raise ConfigError("train_layers: the list is empty")
    if n_layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"train_layers: layer {bad[0]} is out of range; the model has {n_layers} layers "
                              f"(0-{n_layers - 1})")
    return sorted(set(layers))


def decoder_layers(model) -> tuple[str, int]:
    """(module path of the decoder-layer list, its length): the ModuleList as long as num_hidden_layers."""
    import torch.nn as nn

    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return name, n
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__} (no ModuleList of "
                      f"num_hidden_layers={n} modules); use --train-layers all")


def check_train_layers(spec: Union[str, list[int]], model_dir: str) -> None:
    """--train-layers against the checkpoint's config.json and upstack.json, before anything is loaded."""
    layers = parse_train_layers(spec, None)
    folder = Path(model_dir)
    if layers is None or not (folder / "config.json").is_file():
        return
    conf = json.loads((folder / "config.json").read_text())
    n = conf.get("num_hidden_layers") or (conf.get("text_config") or {}).get("num_hidden_layers")
    if layers == "new":
        _new_layers(model_dir, n)
    elif isinstance(n, int):
        parse_train_layers(layers, n)


def _new_layers(model_dir: str, n_layers: Optional[int]) -> list[int]:
    meta = read_upstack_json(model_dir) or {}
    new = (meta.get("upscale") or {}).get("new_layers")
    if not new:
        raise ConfigError(
            f"--train-layers new: {Path(model_dir) / 'upstack.json'} records no new layers (it is written by "
            "`upstack upscale --method interleave`, which adds zero-initialised blocks); give layer indices instead")
    return parse_train_layers([int(i) for i in new], n_layers)


def freeze_for_training(model, spec: Union[str, list[int]], model_dir: str) -> dict:
    """Set requires_grad by --train-layers; return {"train_layers": [...] or "all", "trainable": n, "total": n}.

    For `new` and explicit lists only those decoder layers train; embeddings, final norm and lm_head are
    frozen. `new` reads the layer indices `upstack upscale --method interleave` recorded in upstack.json.
    """
    total = sum(p.numel() for p in model.parameters())
    layers = parse_train_layers(spec, None)
    if layers is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return {"train_layers": "all", "trainable": total, "total": total}
    prefix, n_layers = decoder_layers(model)
    if layers == "new":
        layers = _new_layers(model_dir, n_layers)
    else:
        layers = parse_train_layers(layers, n_layers)
    wanted = tuple(f"{prefix}.{i}." for i in layers)
    trainable = 0
    for name, p in model.named_parameters():
        on = name.startswith(wanted)
        p.requires_grad_(on)
        trainable += p.numel() if on else 0
    return {"train_layers": layers, "trainable": trainable, "total": total}


# ------------------------------------------------------------------------------------------------
# Loss

def master_dtype(cfg: TrainConfig) -> str:
    """The dtype the weights are loaded and trained in: fp32 master weights unless dtype == 'bf16'."""
    return "bfloat16" if cfg.dtype == "bf16" else "float32"


def add_perplexity(metrics: dict, prefix: str) -> dict:
    """perplexity = exp(mean token loss), for train ("") and eval ("eval_") metrics."""
    loss = metrics.get(f"{prefix}loss")
    return {f"{prefix}perplexity": math.exp(min(loss, 50.0))} if loss is not None else {}


def lm_loss(model, batch: dict):
    """Summed next-token cross-entropy over the batch's label tokens (labels are already shifted)."""
    import torch.nn.functional as F

    logits, labels = forward_scored(model, batch)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, {}



class EpochOrder:
    """Item indices as one stream: a seeded permutation per epoch, epoch after epoch."""

    def __init__(self, n_items: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n_items, seed, shuffle
        self._cache: dict[int, Any] = {}

    def _perm(self, epoch: int):
        import numpy as np

        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.clear()
            rng = np.random.default_rng([self.seed, epoch])
            self._cache[epoch] = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        return self._cache[epoch]

    def take(self, start: int, count: int) -> list[int]:
        out = []
        pos = start
        while len(out) < count:
            epoch, i = divmod(pos, self.n)
            perm = self._perm(epoch)
            k = min(count - len(out), self.n - i)
            out.extend(int(x) for x in perm[i:i + k])
            pos += k
        return out


def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine/linear/constant."""
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    if cfg.lr_scheduler == "constant" or total <= warmup:
        return cfg.learning_rate
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = cfg.min_lr_ratio
    if cfg.lr_scheduler == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.learning_rate * (floor + (1.0 - floor) * factor)


# ------------------------------------------------------------------------------------------------
# Run folder, resume, metrics

def work_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.work"


def _file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(size - (1 << 20))
            h.update(f.read())
    return h.hexdigest()[:16]


def model_fingerprint(path: str) -> dict:
    """What identifies a model for --resume: config.json, tokenizer files and weight files (size, first/last MiB)."""
    p = Path(path)
    if not p.is_dir():
        return {"id": path}
    files = sorted(f for f in p.iterdir() if f.is_file() and (
        f.suffix == ".safetensors" or f.name in ("config.json", "special_tokens_map.json", "chat_template.jinja")
        or f.name.startswith("tokenizer")))
    return {f.name: _file_fingerprint(f) for f in files}


def resume_identity(cfg: TrainConfig, stage: str, world_size: int) -> dict:
    conf = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUME_FREE}
    identity = {"stage": stage, "config": conf, "model": model_fingerprint(cfg.model), "world_size": world_size}
    return json.loads(json.dumps(identity, default=str))  # as it reads back from run.json


def _identity_diff(old: dict, new: dict) -> str:
    diffs = []
    if old.get("stage") != new.get("stage"):
        diffs.append(f"stage {old.get('stage')} -> {new.get('stage')}")
    if old.get("model") != new.get("model"):
        diffs.append("the model's weights or config.json changed")
    for k in sorted(set(old.get("config", {})) | set(new.get("config", {}))):
        a, b = old.get("config", {}).get(k), new.get("config", {}).get(k)
        if a != b:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    if old.get("world_size") != new.get("world_size"):
        diffs.append(f"processes: {old.get('world_size')} -> {new.get('world_size')}")
    return "; ".join(diffs)


def list_checkpoints(work: Path) -> list[tuple[int, Path]]:
    found = []
    if work.is_dir():
        for d in work.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and d.is_dir() and (d / "trainer_state.json").is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) and, when installed, TensorBoard; main process only."""

    def __init__(self, work: Path, enabled: bool, tensorboard: bool, resume_step: Optional[int]):
        self.path = work / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step") is None or rec["step"] <= resume_step:
                    kept.append(json.dumps(rec))
            self.path.write_text("".join(k + "\n" for k in kept))
        self.fh = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(work / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:
                log.info("tensorboard is not installed; metrics go to metrics.jsonl only")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.fh.write(json.dumps(record, default=float) + "\n")
        self.fh.flush()
        if self.tb is not None and record.get("step") is not None:
            for k, v in record.items():
                if k not in ("step", "type") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{record.get('type', 'train')}/{k}", v, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.enabled = False
            self.fh.close()
            if self.tb is not None:
                self.tb.close()


@dataclass
class Run:
    """One training run: its config, accelerator, folders and where it resumes from."""

    cfg: TrainConfig
    stage: str
    accelerator: Any
    out: Path
    work: Path
    resume_from: Optional[Path] = None
    state: dict = field(default_factory=dict)
    metrics: Optional[MetricsLog] = None
    info: dict = field(default_factory=dict)       # facts for the summary (data counts, layers, ...)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def pad_multiple(self) -> int:
        """Batch width multiple: --pad-to-multiple-of, else 64 on CUDA (fewer shapes to select kernels
        for) and 1 elsewhere (padding is only cost on a CPU)."""
        if self.cfg.pad_to_multiple_of:
            return self.cfg.pad_to_multiple_of
        return 64 if getattr(self.accelerator.device, "type", "cpu") == "cuda" else 1

    def log(self, msg: str) -> None:
        if self.is_main:
            log.info(msg)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        close_run(self, failed=exc_type is not None and not issubclass(exc_type, KeyboardInterrupt))
        return False


def _cpu_only_launch() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without an accelerator: tell
    accelerate to use CPU processes with gloo (it would otherwise fall back to a single process)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    has = getattr(torch, "accelerator", None)
    return not (has.is_available() if has is not None else torch.cuda.is_available())


def start_run(cfg: TrainConfig, stage: str) -> Run:
    """Check the output and work folders, create the Accelerator, decide fresh start vs resume."""
    from accelerate import Accelerator

    out = Path(cfg.out)
    check_output_free(out, cfg.overwrite)
    check_model_path(cfg.model)
    check_train_layers(cfg.train_layers, cfg.model)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-save INFO lines drown the progress
    mixed = "bf16" if cfg.dtype == "bf16-mixed" else "no"
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed,
                              cpu=_cpu_only_launch())
    work = work_dir_for(out)
    run = Run(cfg, stage, accelerator, out, work)
    try:
        if accelerator.gradient_accumulation_steps != cfg.grad_accum:
            raise ConfigError(
                f"the launch config sets gradient accumulation to {accelerator.gradient_accumulation_steps} "
                f"but --grad-accum is {cfg.grad_accum}: remove gradient_accumulation_steps from the accelerate/"
                "DeepSpeed config and use --grad-accum")
        identity = resume_identity(cfg, stage, accelerator.num_processes)
        run_file = work / "run.json"
        same_run = run_file.is_file() and not _identity_diff(json.loads(run_file.read_text()), identity)
        if work.exists() and not cfg.resume:
            if list_checkpoints(work) and not cfg.overwrite:
                raise OutputExistsError(
                    f"{work} holds an unfinished run (pass --resume to continue it, or --overwrite to start over)")
            accelerator.wait_for_everyone()
            if run.is_main:
                if same_run and not list_checkpoints(work):
                    # A failed start of this very run: keep its caches (token files, reference log-probs).
                    for stale in ("metrics.jsonl", "tensorboard"):
                        p = work / stale
                        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
                else:
                    shutil.rmtree(work)
        if cfg.resume and work.exists() and run_file.is_file():
            diff = _identity_diff(json.loads(run_file.read_text()), identity)
            if diff and not cfg.overwrite:
                raise CheckpointError(f"cannot --resume from {work}: it belongs to a run of another model or "
                                      f"config ({diff}); use --overwrite to start over")
            if diff:  # --resume --overwrite: continue when possible, else start over
                run.log(f"{work} belongs to another run ({diff}); starting over")
                accelerator.wait_for_everyone()
                if run.is_main:
                    shutil.rmtree(work)
                accelerator.wait_for_everyone()
        if cfg.resume and work.exists():
            ckpts = list_checkpoints(work)
            if ckpts:
                run.resume_from = ckpts[-1][1]
                run.state = json.loads((run.resume_from / "trainer_state.json").read_text())
                run.log(f"resuming from {run.resume_from} (step {run.state['step']})")
            else:
                run.log(f"{work} has no checkpoint yet; starting from the beginning")
        elif cfg.resume:
            run.log(f"nothing to resume in {work}; starting from the beginning")
        accelerator.wait_for_everyone()
        if run.is_main:
            work.mkdir(parents=True, exist_ok=True)
            run_file.write_text(json.dumps(identity, indent=2, default=str) + "\n")
        accelerator.wait_for_everyone()
        run.metrics = MetricsLog(work, run.is_main, cfg.tensorboard,
                                 run.state.get("step") if run.resume_from else None)
    except BaseException:
        close_run(run, failed=True)
        raise
    return run


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------------
# Model preparation

def prepare_model(run: Run, model):
    """Gradient checkpointing, optimizer over trainable parameters only, accelerate.prepare."""
    import torch

    cfg = run.cfg
    if cfg.gradient_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    model.train()
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("train_layers: nothing to train (every parameter is frozen)")
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_epsilon)
    from accelerate.utils import DistributedType

    if run.accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed wants the micro-batch size, which it would otherwise read from a prepared DataLoader.
        run.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer = run.accelerator.prepare(model, optimizer)
    return model, optimizer


# ------------------------------------------------------------------------------------------------
# The loop

@dataclass
class Task:
    """What a stage hands the loop."""

    n_items: int
    collate: Callable[[list[int]], dict]
    loss_fn: Callable[[Any, dict], tuple]
    n_eval: int = 0
    eval_collate: Optional[Callable[[list[int]], dict]] = None
    derive: Optional[Callable[[dict, str], dict]] = None  # extra metrics from averaged ones (prefix "" or "eval_")
    shuffle: bool = True


def total_steps(cfg: TrainConfig, n_items: int, world: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    global_batch = cfg.batch_size * cfg.grad_accum * world
    return max(1, math.ceil(cfg.epochs * n_items / global_batch))


def _reduce(run: Run, values: list[float]):
    """Sum a list of numbers over processes (one collective)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=run.accelerator.device)
    if run.world > 1:
        t = run.accelerator.reduce(t, reduction="sum")
    return t.tolist()


def _averaged(sums: dict[str, float], count: float, prefix: str, derive) -> dict:
    out = {f"{prefix}loss": sums.pop("__loss") / max(count, 1)}
    for k, v in sums.items():
        out[f"{prefix}{k}"] = v / max(count, 1)
    if derive is not None:
        out.update(derive(out, prefix))
    return out


def evaluate(run: Run, model, task: Task) -> dict:
    """Eval loss (and stage statistics) over the held-out items; every process runs the same number of
    forward passes (FSDP/ZeRO-3 forwards are collective), padding with zero-weight repeats."""
    import torch

    if not task.n_eval:
        return {}
    b = run.cfg.batch_size
    mine = list(range(run.rank, task.n_eval, run.world))
    n_batches = math.ceil(math.ceil(task.n_eval / run.world) / b)
    sums: dict[str, float] = {}
    count = 0.0
    model.eval()
    with torch.no_grad():
        for i in range(n_batches):
            idx = mine[i * b:(i + 1) * b]
            weight = 1.0 if idx else 0.0
            batch = to_device(task.eval_collate(idx or [0]), run.accelerator.device)
            with run.accelerator.autocast():
                loss, stats = task.loss_fn(model, batch)
            sums["__loss"] = sums.get("__loss", 0.0) + weight * float(loss)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + weight * float(v)
            count += weight * batch["n_loss"]
    model.train()
    keys = sorted(sums)
    reduced = _reduce(run, [sums[k] for k in keys] + [count])
    sums = dict(zip(keys, reduced[:-1]))
    return _averaged(sums, reduced[-1], "eval_", task.derive)


class _StopFlag:
    """Ctrl-C / SIGTERM during training: finish the step, save a checkpoint, then stop."""

    def __init__(self):
        self.signum = 0
        self.old = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        log.warning("interrupted: saving a checkpoint after this step (press Ctrl-C again to stop at once)")
        signal.signal(signum, self.old.get(signum, signal.SIG_DFL)
                      if signum != signal.SIGINT else signal.default_int_handler)

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def save_checkpoint(run: Run, step: int, extra: dict) -> None:
    """accelerate's save_state (model, optimizer, RNG; sharded under FSDP/ZeRO) + trainer_state.json,
    into checkpoint-<step>.tmp renamed at the end, so a crash mid-save never leaves a broken latest one."""
    acc = run.accelerator
    final = run.work / f"checkpoint-{step}"
    tmp = run.work / f"checkpoint-{step}.tmp"
    if run.is_main and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if run.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in list_checkpoints(run.work)[:-max(1, run.cfg.save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def train_loop(run: Run, model, optimizer, task: Task) -> dict:
    """Train for the configured steps; return the summary (last train metrics, eval metrics, speed)."""
    from tqdm import tqdm

    cfg, acc = run.cfg, run.accelerator
    world, rank, b, accum = run.world, run.rank, cfg.batch_size, cfg.grad_accum
    steps = total_steps(cfg, task.n_items, world)
    global_batch = b * accum * world
    order = EpochOrder(task.n_items, cfg.seed, task.shuffle)
    params = [p for p in model.parameters() if p.requires_grad]
    start = int(run.state.get("step", 0)) if run.resume_from else 0
    tokens_seen = int(run.state.get("tokens", 0)) if run.resume_from else 0
    elapsed_before = float(run.state.get("elapsed_s", 0.0)) if run.resume_from else 0.0
    if run.resume_from is not None:
        acc.load_state(str(run.resume_from))
    test_signal = os.environ.get(TEST_SIGNAL_ENV, "")
    run.metrics.write({"type": "start" if not start else "resume", "step": start, "total_steps": steps,
                       "global_batch": global_batch, "processes": world, "items": task.n_items,
                       "eval_items": task.n_eval, **run.info})
    run.log(f"{run.stage}: {steps} steps of {global_batch} {('pairs' if run.stage == 'dpo' else 'sequences')} "
            f"({b} x {accum} accumulation x {world} processes), {task.n_items} training items")
    bar = tqdm(total=steps, initial=start, desc=run.stage, unit="step",
               disable=not (cfg.progress and run.is_main), dynamic_ncols=True)
    last: dict = {}
    eval_metrics: dict = {}
    t_start = time.perf_counter()
    steady_tokens, steady_time = 0, 0.0
    window_tokens, window_start = 0, time.perf_counter()
    last_saved = start
    try:
        with _StopFlag() as stop:
            for step in range(start, steps):
                t0 = time.perf_counter()
                idx = order.take(step * global_batch, global_batch)
                micro = [task.collate(idx[(k * world + rank) * b:(k * world + rank + 1) * b]) for k in range(accum)]
                counts = _reduce(run, [sum(m["n_loss"] for m in micro), sum(m["n_tokens"] for m in micro)])
                n_loss, n_tokens = counts
                scale = accum * world / max(n_loss, 1.0)
                lr = lr_at(cfg, step, steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                sums: dict[str, Any] = {}
                grad_norm = None
                for mb in micro:
                    mb = to_device(mb, acc.device)
                    with acc.accumulate(model):
                        with acc.autocast():
                            loss, stats = task.loss_fn(model, mb)
                        acc.backward(loss * scale)
                        if acc.sync_gradients and cfg.max_grad_norm > 0:
                            grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    sums["__loss"] = sums.get("__loss", 0.0) + loss.detach()
                    for k, v in stats.items():
                        sums[k] = sums.get(k, 0.0) + v.detach()
                keys = sorted(sums)
                reduced = _reduce(run, [float(sums[k]) for k in keys])
                tokens_seen += int(n_tokens)
                dt = time.perf_counter() - t0
                if step > start:  # the first step of a session pays one-off costs
                    steady_tokens += int(n_tokens)
                    steady_time += dt
                window_tokens += int(n_tokens)
                last = _averaged(dict(zip(keys, reduced)), n_loss, "", task.derive)
                done = step + 1
                if done % cfg.logging_steps == 0 or done == steps or done == start + 1:
                    now = time.perf_counter()
                    tps = window_tokens / max(now - window_start, 1e-9)
                    window_tokens, window_start = 0, now
                    rec = {"type": "train", "step": done, "epoch": done * global_batch / task.n_items, **last,
                           "lr": lr, "tokens": tokens_seen, "tokens_per_s": tps,
                           "elapsed_s": elapsed_before + now - t_start}
                    if grad_norm is not None:
                        rec["grad_norm"] = float(grad_norm)
                    run.metrics.write(rec)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                bar.update(1)
                if cfg.eval_steps and done % cfg.eval_steps == 0 and done < steps and task.n_eval:
                    eval_metrics = evaluate(run, model, task)
                    run.metrics.write({"type": "eval", "step": done, **eval_metrics})
                if test_signal == f"{done}:INT":
                    os.kill(os.getpid(), signal.SIGINT)
                stop_now = stop.signum and done < steps  # a stop at the last step just finishes
                if world > 1:  # every process must agree, or the checkpoint's collectives would hang
                    stop_now = bool(_reduce(run, [float(bool(stop_now))])[0])
                if (cfg.save_steps and done % cfg.save_steps == 0 and done < steps) or stop_now:
                    save_checkpoint(run, done, {"tokens": tokens_seen,
                                                "elapsed_s": elapsed_before + time.perf_counter() - t_start})
                    last_saved = done
                if stop_now:
                    raise KeyboardInterrupt
                if test_signal == f"{done}:KILL":
                    os.kill(os.getpid(), signal.SIGKILL)
    except KeyboardInterrupt:
        bar.close()
        if last_saved > 0:
            run.log(f"stopped; the latest checkpoint is {run.work / f'checkpoint-{last_saved}'} "
                    "(run the same command with --resume to continue)")
        run.metrics.close()
        raise
    bar.close()
    if task.n_eval:
        eval_metrics = evaluate(run, model, task)
        run.metrics.write({"type": "eval", "step": steps, **eval_metrics})
    summary = {"steps": steps, "tokens": tokens_seen, **{f"final_{k}": v for k, v in last.items()}, **eval_metrics,
               "tokens_per_s": steady_tokens / steady_time if steady_time else None,
               "train_seconds": elapsed_before + time.perf_counter() - t_start, "peak_rss_mb": peak_rss_mb()}
    return summary


# ------------------------------------------------------------------------------------------------
# Output

def save_final(run: Run, model, tokenizer, summary: dict, *, input_dtype: str) -> dict:
    """The output folder: a plain HF checkpoint (safetensors, config, generation config, tokenizer)
    in the input's dtype (or --save-dtype), plus upstack.json carried forward, train_config.json,
    metrics.jsonl and TensorBoard logs; written atomically, then the work folder is removed.
    Returns the summary with "out" and "save_dtype" added."""
    import torch
    from accelerate.utils import DistributedType

    acc, cfg = run.accelerator, run.cfg
    save_dtype = TORCH_DTYPE_NAMES[normalize_dtype(cfg.save_dtype)] if cfg.save_dtype else input_dtype
    summary = {**summary, "out": str(run.out), "save_dtype": save_dtype, "stage": run.stage}
    acc.wait_for_everyone()
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state_dict = acc.get_state_dict(model) if sharded else None
    if run.is_main:
        run.metrics.write({"type": "summary", **{k: v for k, v in summary.items() if k != "data"}})
        run.metrics.close()
        unwrapped = acc.unwrap_model(model)
        target = getattr(torch, save_dtype)
        if state_dict is not None:
            state_dict = {k: v.to(target) for k, v in state_dict.items()}
        else:
            unwrapped.to(target)
        with atomic_output_dir(run.out, overwrite=cfg.overwrite) as tmp:
            unwrapped.save_pretrained(tmp, state_dict=state_dict, max_shard_size="5GB")
            conf_path = tmp / "config.json"
            conf = json.loads(conf_path.read_text())
            conf["dtype"] = save_dtype
            conf.pop("torch_dtype", None)
            conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
            tokenizer.save_pretrained(tmp)
            meta = read_upstack_json(cfg.model)
            if meta is not None:
                (tmp / "upstack.json").write_text(json.dumps(meta, indent=2) + "\n")
            (tmp / "train_config.json").write_text(
                json.dumps({"stage": run.stage, **config_to_dict(cfg)}, indent=2, default=str) + "\n")
            shutil.copy2(run.work / "metrics.jsonl", tmp / "metrics.jsonl")
            if (run.work / "tensorboard").is_dir():
                shutil.copytree(run.work / "tensorboard", tmp / "tensorboard")
        if not cfg.keep_checkpoints:
            shutil.rmtree(run.work, ignore_errors=True)
    acc.wait_for_everyone()
    return summary


_DISPOSABLE = {"run.json", "metrics.jsonl", "tensorboard"}


def close_run(run: Run, failed: bool = False) -> None:
    """End a run, finished or failed: close the metrics file; drop the work folder of a run that failed
    before leaving anything worth resuming (a checkpoint or a cache); with several processes, tear the
    process group down so a launcher's processes exit; with one, reset accelerate's process-wide state so
    the next stage in this process can choose another precision or accumulation."""
    if run.metrics is not None:
        run.metrics.close()
    if failed and run.is_main and run.work.is_dir() and {p.name for p in run.work.iterdir()} <= _DISPOSABLE:
        shutil.rmtree(run.work, ignore_errors=True)
    acc = run.accelerator
    acc.free_memory()  # drop its references to the model and optimizer (and empty the CUDA cache)
    if acc.num_processes > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
