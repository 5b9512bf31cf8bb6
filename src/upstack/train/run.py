"""One training run: its folders (`<out>.work` beside the output), accelerator, resume decision and teardown.

A run is resumable when its work folder holds a checkpoint and its run.json identity (stage, the
options that change what is trained, fingerprints of the model and of the data files, the process count)
matches. The main process holds the work folder's lock (`.OUT.work.lock`) for the whole run: a second
run into the same OUT is refused, naming the first one's PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from upstack.config import config_to_dict
from upstack.data.sources import resolve_files
from upstack.errors import CheckpointError, ConfigError, OutputExistsError, UpstackError
from upstack.lm import check_model_path, cpu_only_launch
from upstack.outputs import check_output_free, file_identity, output_lock
from upstack.train.config import TrainConfig, train_and_eval_specs
from upstack.train.layers import check_train_layers
from upstack.train.metrics import MetricsLog, report_to_names, reset_peak_rss

log = logging.getLogger("upstack.train")

# Options that may change between a run and its --resume (they do not change what is trained).
IN_PIPELINE = "UPSTACK_IN_PIPELINE"  # set by `upstack run`: the process group outlives each training stage
RESUME_FREE = {"resume", "overwrite", "progress", "save_steps", "save_total_limit", "logging_steps",
               "tensorboard", "report_to", "keep_checkpoints", "eval_steps", "eval_at_start"}
# What a failed start leaves that is not worth keeping (no checkpoint, no cache).
_DISPOSABLE = {"run.json", "metrics.jsonl", "tensorboard"}


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
    identity: dict = field(default_factory=dict)   # resume_identity: what this run trains, on what
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # the work folder's lock
    locked: bool = False                           # this process holds it (never touch another run's folder)
    sharding: str = "none"                         # fsdp (upstack's FSDP2), deepspeed, ddp or none
    model: Any = None                              # under FSDP: the sharded model and its optimizer, for the
    optimizer: Any = None                          # sharded checkpoints (accelerate's save_state does not see them)

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

    def warn(self, msg: str) -> None:
        if self.is_main:
            log.warning(msg)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        close_run(self, failed=exc_type is not None and not issubclass(exc_type, KeyboardInterrupt))
        return False


# ------------------------------------------------------------------------------------------------
# Resume identity

def work_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.work"


def model_fingerprint(path: str) -> dict:
    """What identifies a model for --resume: config.json, tokenizer files and weight files."""
    p = Path(path)
    if not p.is_dir():
        return {"id": path}
    files = sorted(f for f in p.iterdir() if f.is_file() and (
        f.suffix == ".safetensors" or f.name in ("config.json", "special_tokens_map.json", "chat_template.jinja")
        or f.name.startswith("tokenizer")))
    return {f.name: file_identity(f) for f in files}


def tokenizer_fingerprint(path: str) -> dict:
    """The part of model_fingerprint that decides tokenization (for token caches)."""
    return {k: v for k, v in model_fingerprint(path).items() if not k.endswith(".safetensors") and k != "config.json"}


def data_fingerprint(specs: list) -> list:
    """For each data spec, the identity of every local file it reads ({path: identity}); a hub dataset by
    its spec alone. Used by resumes and token/log-prob caches: an edited file changes it."""
    out = []
    for spec in specs:
        try:
            files = resolve_files(spec, text=True)
        except UpstackError as e:  # the stage reports it when it loads the data
            out.append({spec.path: f"unreadable: {e}"})
            continue
        out.append({spec.path: "hub"} if files is None else {str(f): file_identity(f) for f in files})
    return out


def inputs_fingerprint(cfg: TrainConfig) -> dict:
    """The data files (training and eval) and a reference model of a run, by content identity."""
    specs, eval_specs = train_and_eval_specs(cfg)
    found = {"data": data_fingerprint(specs), "eval_data": data_fingerprint(eval_specs)}
    if getattr(cfg, "ref_model", None):
        found["ref_model"] = model_fingerprint(cfg.ref_model)
    return found


def resume_identity(cfg: TrainConfig, stage: str, world_size: int, sharding: str = "none") -> dict:
    conf = {k: v for k, v in config_to_dict(cfg).items() if k not in RESUME_FREE}
    identity = {"stage": stage, "config": conf, "model": model_fingerprint(cfg.model),
                "inputs": inputs_fingerprint(cfg), "world_size": world_size}
    if sharding == "fsdp":  # its checkpoints are sharded (torch.distributed.checkpoint), not accelerate's
        identity["sharding"] = sharding
    return json.loads(json.dumps(identity, default=str))  # as it reads back from run.json


def identity_key(identity: dict) -> str:
    """A short hash of an identity (or any JSON-able key), recorded beside a cache it made."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:24]


def identity_diff(old: dict, new: dict) -> str:
    """What differs between two run identities, for a message ("" when they are the same run)."""
    diffs = []
    if old.get("stage") != new.get("stage"):
        diffs.append(f"stage {old.get('stage')} -> {new.get('stage')}")
    if old.get("model") != new.get("model"):
        diffs.append("the model's weights or config.json changed")
    diffs += _inputs_diff(old.get("inputs", {}), new.get("inputs", {}))
    for k in sorted(set(old.get("config", {})) | set(new.get("config", {}))):
        a, b = old.get("config", {}).get(k), new.get("config", {}).get(k)
        if a != b:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    if old.get("world_size") != new.get("world_size"):
        diffs.append(f"processes: {old.get('world_size')} -> {new.get('world_size')}")
    if old.get("sharding", "none") != new.get("sharding", "none"):
        diffs.append(f"sharding: {old.get('sharding', 'none')} -> {new.get('sharding', 'none')}")
    return "; ".join(diffs)


def _inputs_diff(old: dict, new: dict) -> list[str]:
    """Which data files (or the reference model) differ between two identities' inputs."""
    diffs = []
    for key in ("data", "eval_data"):
        a, b = old.get(key, []), new.get(key, [])
        if a == b:
            continue
        if len(a) != len(b) or [list(x) for x in a] != [list(x) for x in b]:
            diffs.append(f"{key}: other files")
            continue
        for fa, fb in zip(a, b):
            diffs += [f"{key} file {f} changed" for f in fb if fa.get(f) != fb.get(f)]
    if old.get("ref_model") != new.get("ref_model"):
        diffs.append("the reference model changed")
    return diffs


def list_checkpoints(work: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete resumable checkpoints in a work folder, oldest first."""
    found = []
    if work.is_dir():
        for d in work.iterdir():
            m = re.fullmatch(r"checkpoint-(\d+)", d.name)
            if m and d.is_dir() and (d / "trainer_state.json").is_file():
                found.append((int(m.group(1)), d))
    return sorted(found)


# ------------------------------------------------------------------------------------------------
# Start and end

def _sharding_of(acc, fsdp: bool) -> str:
    from accelerate.utils import DistributedType

    if fsdp:
        return "fsdp"
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    if acc.distributed_type == DistributedType.FSDP:  # not reached: check_fsdp takes FSDP over from accelerate
        return "fsdp"
    return "ddp" if acc.num_processes > 1 else "none"


def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-save INFO lines drown the progress
    mixed = "bf16" if cfg.dtype == "bf16-mixed" else "no"
    return Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mixed, cpu=cpu_only_launch())


def _check_accumulation(run: Run) -> None:
    steps = run.accelerator.gradient_accumulation_steps
    if steps != run.cfg.grad_accum:
        raise ConfigError(
            f"the launch config sets gradient accumulation to {steps} but --grad-accum is {run.cfg.grad_accum}: "
            "remove gradient_accumulation_steps from the accelerate/DeepSpeed config and use --grad-accum")


def _read_identity(run_file: Path) -> dict:
    return json.loads(run_file.read_text())


def _clear_for_fresh_start(run: Run, identity: dict) -> None:
    """Without --resume: refuse an unfinished run unless --overwrite; else clear the work folder, keeping the
    caches of a failed start of this very run (token files, reference log-probs)."""
    work, run_file = run.work, run.work / "run.json"
    same_run = run_file.is_file() and not identity_diff(_read_identity(run_file), identity)
    if list_checkpoints(work) and not run.cfg.overwrite:
        raise OutputExistsError(
            f"{work} holds an unfinished run (pass --resume to continue it, or --overwrite to start over)")
    run.accelerator.wait_for_everyone()
    if run.is_main:
        if same_run and not list_checkpoints(work):
            for stale in ("metrics.jsonl", "tensorboard"):
                p = work / stale
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        else:
            shutil.rmtree(work)


def _check_resume_identity(run: Run, identity: dict) -> None:
    """--resume into a work folder of another model or config: refused, or with --overwrite started over."""
    work = run.work
    diff = identity_diff(_read_identity(work / "run.json"), identity)
    if diff and not run.cfg.overwrite:
        raise CheckpointError(f"cannot --resume from {work}: it belongs to a run of another model, data or "
                              f"config ({diff}); use --overwrite to start over")
    if diff:  # --resume --overwrite: continue when possible, else start over
        run.log(f"{work} belongs to another run ({diff}); starting over")
        run.accelerator.wait_for_everyone()
        if run.is_main:
            shutil.rmtree(work)
        run.accelerator.wait_for_everyone()


def _find_resume_point(run: Run) -> None:
    """--resume: the latest checkpoint of the work folder, if any, and its trainer_state.json."""
    work = run.work
    if not work.exists():
        log.debug("nothing to resume in %s; starting from the beginning", work)
        return
    ckpts = list_checkpoints(work)
    if ckpts:
        run.resume_from = ckpts[-1][1]
        run.state = json.loads((run.resume_from / "trainer_state.json").read_text())
        run.log(f"resuming from {run.resume_from} (step {run.state['step']})")
    else:
        run.log(f"{work} has no checkpoint yet; starting from the beginning")


def check_shared_work_dir(run: Run, text: str) -> None:
    """Several processes: every one must read the run.json the main process just wrote into the work
    folder, or checkpoints saved by one process would be missing for another at --resume (a multi-node run
    with OUT on a node-local disk). Refused in one line before any training step."""
    if run.world <= 1:
        return
    import torch

    p = run.work / "run.json"
    try:
        ok = p.is_file() and p.read_text() == text
    except OSError:
        ok = False
    flags = run.accelerator.gather(torch.tensor([0 if ok else run.rank + 1], device=run.accelerator.device))
    blind = sorted(int(f) - 1 for f in flags.reshape(-1).tolist() if f)
    if blind:
        raise ConfigError(f"the work folder {run.work} is not on storage every process sees (process(es) "
                          f"{', '.join(map(str, blind))} cannot read the run.json process 0 wrote there): put --out "
                          "on shared storage (NFS, Lustre, a cluster file system) for a multi-node run")


def _open_work_dir(run: Run, identity: dict) -> None:
    """Create the work folder with this run's run.json, and open its metrics log."""
    run.accelerator.wait_for_everyone()
    text = json.dumps(identity, indent=2, default=str) + "\n"
    if run.is_main:
        run.work.mkdir(parents=True, exist_ok=True)
        (run.work / "run.json").write_text(text)
    run.accelerator.wait_for_everyone()
    check_shared_work_dir(run, text)
    names = report_to_names(run.cfg.report_to)
    run.metrics = MetricsLog(run.work, run.is_main, run.cfg.tensorboard and "tensorboard" in names,
                             run.state.get("step") if run.resume_from else None,
                             trackers=tuple(n for n in names if n != "tensorboard"),
                             run_name=f"{run.out.name}-{run.stage}", config={"stage": run.stage,
                                                                              **config_to_dict(run.cfg)})


def _remove_partial_checkpoints(work: Path) -> None:
    """checkpoint-N.tmp folders a killed run left (the lock is held, so no live run is writing them)."""
    if work.is_dir():
        for d in work.glob("checkpoint-*.tmp"):
            log.warning(f"removed the partial checkpoint {d} of a run that stopped mid-save")
            shutil.rmtree(d, ignore_errors=True)


def start_run(cfg: TrainConfig, stage: str) -> Run:
    """Check the output and work folders, create the Accelerator, decide fresh start vs resume."""
    from upstack.train.sharding import check_fsdp

    fsdp = check_fsdp(cfg)  # an FSDP launch that cannot shard is refused here, before any work
    reset_peak_rss()  # the stage's summary reports this stage's peak memory
    out = Path(cfg.out)
    check_output_free(out, cfg.overwrite)
    check_model_path(cfg.model)
    check_train_layers(cfg.train_layers, cfg.model)
    run = Run(cfg, stage, _make_accelerator(cfg), out, work_dir_for(out))
    run.sharding = _sharding_of(run.accelerator, fsdp)
    try:
        _check_accumulation(run)
        if run.is_main:
            run.held.enter_context(output_lock(run.work, "trained"))
            run.locked = True
            _remove_partial_checkpoints(run.work)
        identity = run.identity = resume_identity(cfg, stage, run.world, run.sharding)
        if run.work.exists() and not cfg.resume:
            _clear_for_fresh_start(run, identity)
        if cfg.resume and run.work.exists() and (run.work / "run.json").is_file():
            _check_resume_identity(run, identity)
        if cfg.resume:
            _find_resume_point(run)
        _open_work_dir(run, identity)
    except BaseException:
        close_run(run, failed=True)
        raise
    return run


def close_run(run: Run, failed: bool = False) -> None:
    """End a run, finished or failed: close the metrics file; drop the work folder of a run that failed
    before leaving anything worth resuming (a checkpoint or a cache); with several processes, tear the
    process group down so a launcher's processes exit; with one, reset accelerate's process-wide state so
    the next stage in this process can choose another precision or accumulation."""
    if run.metrics is not None:
        run.metrics.close()
    if failed and run.locked and run.work.is_dir() and {p.name for p in run.work.iterdir()} <= _DISPOSABLE:
        shutil.rmtree(run.work, ignore_errors=True)
    run.held.close()  # release the work folder's lock
    run.model = run.optimizer = None
    acc = run.accelerator
    acc.free_memory()  # drop its references to the model and optimizer (and empty the CUDA cache)
    from accelerate.state import AcceleratorState, GradientState

    if acc.num_processes > 1:
        import torch.distributed as dist

        if os.environ.get(IN_PIPELINE) == "1":  # later stages of `upstack run` use the same process group
            acc.wait_for_everyone()
            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()
        elif dist.is_initialized():
            dist.destroy_process_group()
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
