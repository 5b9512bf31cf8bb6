"""Metric records: metrics.jsonl (+ TensorBoard), averages over a global batch, derived metrics."""

from __future__ import annotations

import json
import logging
import math
import resource
from pathlib import Path
from typing import Callable, Optional

from upstack.errors import UpstackError
from upstack.outputs import open_nofollow, refuse_link, write_file

log = logging.getLogger("upstack.train")

# Extra metrics computed from averaged ones; the prefix is "" (train) or "eval_".
Derive = Callable[[dict, str], dict]


_TB_NOTED = False  # the missing-tensorboard line is said once per process


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) and, when installed, TensorBoard; main process only."""

    def __init__(self, work: Path, enabled: bool, tensorboard: bool, resume_step: Optional[int],
                 trackers: tuple[str, ...] = (), run_name: str = "", config: Optional[dict] = None):
        self.path = work / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        self.trackers: list = []
        if not enabled:
            return
        refuse_link(self.path)  # never read or written through a link planted in the work folder
        self.trackers = start_trackers(trackers, run_name, config or {})
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.fh = open_nofollow(self.path, "a" if resume_step is not None else "w")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(work / "tensorboard"),
                                        purge_step=None if resume_step is None else resume_step + 1)
            except ImportError:
                self.tb_missing = True  # said once per process, at the first record (not before an error)

    def _truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step` (a resumed run logs them again) and lines cut by a crash."""
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if rec.get("step") is None or rec["step"] <= step:
                kept.append(json.dumps(rec))
        write_file(self.path, "".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        global _TB_NOTED
        if not self.enabled:
            return
        if getattr(self, "tb_missing", False) and not _TB_NOTED:
            _TB_NOTED = True
            log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
        self.fh.write(json.dumps(record, default=float) + "\n")
        self.fh.flush()
        if record.get("step") is None or not (self.tb is not None or self.trackers):
            return
        values = {f"{record.get('type', 'train')}/{k}": v for k, v in record.items()
                  if k not in ("step", "type") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, record["step"])
        for tracker in self.trackers:
            tracker.log(values, step=record["step"])

    def close(self) -> None:
        if self.enabled:
            self.enabled = False
            self.fh.close()
            if self.tb is not None:
                self.tb.close()
            for tracker in self.trackers:
                tracker.finish()


# --report-to: TensorBoard is written by MetricsLog itself (as before); these go through accelerate's
# tracker classes. Offline use: WANDB_MODE=offline (and WANDB_DIR), MLFLOW_TRACKING_URI (sqlite:///f.db, or
# file:/path with MLFLOW_ALLOW_FILE_STORE=true), TRACKIO_DIR (trackio's local database).
TRACKERS = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}  # name -> the package it needs
REPORT_TO = ("tensorboard", *TRACKERS, "none")


def report_to_names(value) -> list[str]:
    """--report-to as a list of names ("a,b" or a list); "none" means none."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = [str(x).strip().lower() for x in items if str(x).strip()]
    return [] if names == ["none"] else names


def tracker_problems(value) -> list[str]:
    """Values only, plus whether each tracker's package is installed (no import)."""
    import importlib.util

    problems = []
    for name in report_to_names(value):
        if name not in REPORT_TO or name == "none":
            problems.append(f"report_to: {name!r} is not one of {', '.join(REPORT_TO)}")
        elif name in TRACKERS and importlib.util.find_spec(TRACKERS[name]) is None:
            problems.append(f"report_to: {name} is not installed (pip install {TRACKERS[name]})")
    return problems


def _flat_config(config: dict) -> dict:
    """Tracker-friendly hyperparameters: scalars as they are, everything else as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v, default=str)
            for k, v in config.items()}


def start_trackers(names, run_name: str, config: dict) -> list:
    """Started accelerate trackers for the names that are not TensorBoard, with the run's config stored."""
    if not [n for n in names if n in TRACKERS]:
        return []  # accelerate.tracking imports every tracker library it finds: only when one is asked for
    from accelerate.tracking import MLflowTracker, TrackioTracker, WandBTracker

    out = []
    for name in names:
        if name == "wandb":
            tracker = WandBTracker("upstack", name=run_name)  # WANDB_DIR (default ./wandb) says where
        elif name == "mlflow":
            tracker = MLflowTracker(experiment_name="upstack", run_name=run_name)
        elif name == "trackio":
            tracker = TrackioTracker("upstack", name=run_name)
        else:
            continue
        try:
            tracker.start()
            tracker.store_init_configuration(_flat_config(config))
        except Exception as e:  # each tracker library raises its own errors (bad URI, no login, ...)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UpstackError(f"--report-to {name}: cannot start the tracker ({type(e).__name__}: {first})") from None
        out.append(tracker)
    return out


def averaged(sums: dict[str, float], count: float, prefix: str, derive: Optional[Derive]) -> dict:
    """Summed loss ("__loss") and statistics -> per-item means named with `prefix`, plus derived metrics."""
    out = {f"{prefix}loss": sums.pop("__loss") / max(count, 1)}
    for k, v in sums.items():
        out[f"{prefix}{k}"] = v / max(count, 1)
    if derive is not None:
        out.update(derive(out, prefix))
    return out


def add_perplexity(metrics: dict, prefix: str) -> dict:
    """perplexity = exp(mean token loss), for train ("") and eval ("eval_") metrics."""
    loss = metrics.get(f"{prefix}loss")
    return {f"{prefix}perplexity": math.exp(min(loss, 50.0))} if loss is not None else {}


def trim_heap() -> None:
    """Collect garbage and hand the heap glibc keeps from freed blocks back to the system (Linux; elsewhere
    only the collection): after loading or quantizing a model, whose temporaries would otherwise stay
    counted in the process's memory for the whole run."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def release_mapped_pages(model) -> int:
    """Linux 5.4+: hand back the pages this process has read through mmap from the files of checkpoint
    `model` (a folder, or a Hub id in the local cache; madvise MADV_PAGEOUT; bytes advised returned, 0
    where not supported). transformers reads a checkpoint through a private mapping; after QLoRA quantizes
    the linear weights, the bf16 pages they were read from stay mapped and counted in the process's memory
    (a 10.7B model's whole 21 GB) while only the embeddings, head and norms are still used in place.
    Page-out is reclaim, not discard: clean pages are read back from the file on their next access and any
    page written in place keeps its contents. Files are matched by their real path (the Hub cache's
    snapshot files are links to its blobs, and the mappings name the blobs)."""
    import ctypes

    files = _checkpoint_files(model)
    if not files:
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except (OSError, AttributeError):
        return 0
    advised = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[5].rstrip("\n") not in files:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if libc.madvise(lo, hi - lo, 21) == 0:  # MADV_PAGEOUT
            advised += hi - lo
    return advised


def _checkpoint_files(model) -> set[str]:
    """Real paths of the files in checkpoint folder `model`, or in a Hub id's cached snapshot."""
    import os
    from pathlib import Path

    folder = Path(model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(model), local_files_only=True))
        except (ImportError, OSError, ValueError):
            return set()
    try:
        return {os.path.realpath(f) for f in folder.iterdir() if f.is_file()}
    except OSError:
        return set()


def reset_peak_rss() -> None:
    """Start a new peak-memory count for this stage: Linux (4.0 and later) resets the process's peak RSS
    (VmHWM) to its current RSS when 5 is written to /proc/self/clear_refs. In a recipe, where every stage
    runs in one process, each stage then reports its own peak, not the highest of the stages before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak RSS in MB since `reset_peak_rss` (VmHWM); where /proc is missing, the process's lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
