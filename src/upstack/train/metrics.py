"""Metric records: metrics.jsonl (+ TensorBoard), averages over a global batch, derived metrics."""

from __future__ import annotations

import json
import logging
import math
import resource
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("upstack.train")

# Extra metrics computed from averaged ones; the prefix is "" (train) or "eval_".
Derive = Callable[[dict, str], dict]


_TB_NOTED = False  # the missing-tensorboard line is said once per process


class MetricsLog:
    """metrics.jsonl (one JSON object per line, flushed) and, when installed, TensorBoard; main process only."""

    def __init__(self, work: Path, enabled: bool, tensorboard: bool, resume_step: Optional[int]):
        self.path = work / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self.fh = open(self.path, "a" if resume_step is not None else "w", encoding="utf-8")
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
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict) -> None:
        global _TB_NOTED
        if not self.enabled:
            return
        if getattr(self, "tb_missing", False) and not _TB_NOTED:
            _TB_NOTED = True
            log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
