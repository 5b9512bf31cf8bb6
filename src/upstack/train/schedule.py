"""Step arithmetic: how many optimizer steps, which items each step reads, the learning rate at each step.

Data order: one seeded permutation of the items per epoch, read as a continuous stream in global
batches of batch_size x grad_accum x processes (the loop slices a global batch into micro-batches).
"""

from __future__ import annotations

import math
from typing import Any

from upstack.errors import ConfigError
from upstack.train.config import TrainConfig


def global_batch_size(cfg: TrainConfig, world: int) -> int:
    """Items per optimizer step: batch_size x grad_accum x processes."""
    return cfg.batch_size * cfg.grad_accum * world


def fit_batch_to_items(cfg: TrainConfig, n_items: int, world: int, what: str, log) -> None:
    """A step must not use an item twice: when batch_size x grad_accum x processes exceeds the items (a
    small set, or few packed rows), cap --batch-size to fit and say so; refuse when even 1 does not fit."""
    if global_batch_size(cfg, world) <= n_items:
        return
    fit = n_items // (cfg.grad_accum * world)
    if fit < 1:
        raise ConfigError(f"only {n_items} training {what}, fewer than --grad-accum {cfg.grad_accum} x {world} "
                          "process(es): a step would use one twice; lower --grad-accum or add data")
    log(f"--batch-size {cfg.batch_size} capped to {fit}: there are only {n_items} training {what}, and a step "
        f"must not use one twice ({fit} x {cfg.grad_accum} accumulation x {world} process(es) per step)")
    cfg.batch_size = fit


def total_steps(cfg: TrainConfig, n_items: int, world: int) -> int:
    """--max-steps, else enough global batches for --epochs passes over the items (at least 1)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_items / global_batch_size(cfg, world)))


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
