"""The training loop that serves pretrain, sft and dpo.

A stage turns its data into *items* (packed blocks, encoded chats, preference pairs) and hands the loop
a Task: `collate(item_indices) -> micro-batch` and `loss_fn(model, batch) -> (summed loss, summed
statistics)`. The loop owns the rest:

- data order (schedule.py): micro-batch k of process r is the (k * processes + r)-th slice of the global
  batch, so 1 process x accumulation 2 sees exactly the batches of 2 processes x accumulation 1;
- loss normalisation over the whole global batch (label tokens, or pairs for DPO), counted before the
  backward pass, so the gradient does not depend on how the batch is split;
- the learning rate (schedule.py), set on the optimizer at every step;
- resumable checkpoints (checkpointing.py) every --save-steps; Ctrl-C/SIGTERM save one before exiting;
- metrics.jsonl (+ TensorBoard), held-out loss every --eval-steps and at the end, and a progress bar.

Step callbacks: every callable in STEP_CALLBACKS is called as `callback(run, step)` after each optimizer
step (`step` counts completed steps, from 1), once that step's metrics and eval are written and before
the checkpoint/stop decision -- so a callback that sends this process SIGINT gets a checkpoint of this
step and a clean stop (the resume tests crash and interrupt real runs this way). Register with
`STEP_CALLBACKS.append(fn)` before the stage runs.

accelerate supplies devices, DDP and DeepSpeed; FSDP2 is upstack's own (sharding.py: the model is sharded
before the loop, gradients are reduce-scattered in each backward pass, clipping is over DTensors);
nothing here assumes one process or a CPU.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from upstack.lm import to_device
from upstack.outputs import Terminated
from upstack.train.checkpointing import load_checkpoint, save_checkpoint
from upstack.train.metrics import Derive, averaged, peak_rss_mb
from upstack.train.run import Run
from upstack.train.schedule import EpochOrder, global_batch_size, lr_at, total_steps
from upstack.train.sharding import clip_grad_norm_

log = logging.getLogger("upstack.train")

StepCallback = Callable[[Run, int], None]
STEP_CALLBACKS: list[StepCallback] = []


@dataclass
class Task:
    """What a stage hands the loop."""

    n_items: int
    collate: Callable[[list[int]], dict]
    loss_fn: Callable[[Any, dict], tuple]
    n_eval: int = 0
    eval_collate: Optional[Callable[[list[int]], dict]] = None
    derive: Optional[Derive] = None  # extra metrics from averaged ones (prefix "" or "eval_")
    shuffle: bool = True


@dataclass
class _Progress:
    """What the loop keeps across the steps of one session (a run resumed is a new session)."""

    start: int                    # first step of this session
    tokens: int                   # tokens trained on, all sessions
    elapsed_before: float         # seconds of the earlier sessions
    last_saved: int = 0           # step of the latest resumable checkpoint
    last: dict = field(default_factory=dict)  # the latest step's train metrics
    t_start: float = field(default_factory=time.perf_counter)
    steady_tokens: int = 0        # tokens and seconds after the session's first step (which pays one-off costs)
    steady_time: float = 0.0
    window_tokens: int = 0        # tokens since the last logged step
    window_start: float = field(default_factory=time.perf_counter)
    window_loss: float = 0.0      # summed step losses since the last logged step (the progress bar's mean)
    window_steps: int = 0
    postfix: dict = field(default_factory=dict)  # the progress bar's lr and tokens/s at the last logged step

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def mean_loss(self) -> float:
        """The running mean loss of the current logging window (what the progress bar shows)."""
        return self.window_loss / max(self.window_steps, 1)

    def count(self, step: int, n_tokens: int, seconds: float) -> None:
        self.window_loss += float(self.last.get("loss", 0.0))
        self.window_steps += 1
        self.tokens += n_tokens
        if step > self.start:
            self.steady_tokens += n_tokens
            self.steady_time += seconds
        self.window_tokens += n_tokens

    def window_speed(self) -> float:
        """Tokens per second since the last call (the logging window), and start a new window."""
        now = time.perf_counter()
        tps = self.window_tokens / max(now - self.window_start, 1e-9)
        self.window_tokens, self.window_start = 0, now
        return tps


def sum_over_processes(run: Run, values: list[float]) -> list[float]:
    """Sum a list of numbers over processes (one collective)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=run.accelerator.device)
    if run.world > 1:
        t = run.accelerator.reduce(t, reduction="sum")
    return t.tolist()


def _add(sums: dict, loss, stats: dict) -> None:
    """Add a batch's summed loss (as "__loss") and statistics to running sums."""
    sums["__loss"] = sums.get("__loss", 0.0) + loss
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + v


# ------------------------------------------------------------------------------------------------
# One optimizer step

def micro_batches(run: Run, task: Task, idx: list[int]) -> list[dict]:
    """This process's micro-batches of a global batch: slice k * processes + rank for k < grad_accum."""
    b, world, rank = run.cfg.batch_size, run.world, run.rank
    return [task.collate(idx[(k * world + rank) * b:(k * world + rank + 1) * b]) for k in range(run.cfg.grad_accum)]


def train_step(run: Run, model, optimizer, task: Task, micro: list[dict], lr: float, params: list):
    """One optimizer step with gradient accumulation over `micro`, the loss normalised by the label count
    of the whole global batch. Returns (train metrics, tokens in the global batch, grad norm or None)."""
    cfg, acc = run.cfg, run.accelerator
    n_loss, n_tokens = sum_over_processes(run, [sum(m["n_loss"] for m in micro), sum(m["n_tokens"] for m in micro)])
    scale = cfg.grad_accum * run.world / max(n_loss, 1.0)
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
                grad_norm = (clip_grad_norm_(params, cfg.max_grad_norm) if run.sharding == "fsdp"
                             else acc.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _add(sums, loss.detach(), {k: v.detach() for k, v in stats.items()})
    keys = sorted(sums)
    reduced = sum_over_processes(run, [float(sums[k]) for k in keys])
    return averaged(dict(zip(keys, reduced)), n_loss, "", task.derive), n_tokens, grad_norm


# ------------------------------------------------------------------------------------------------
# Held-out loss

def held_out_loss(run: Run, model, task: Task) -> dict:
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
            _add(sums, weight * float(loss), {k: weight * float(v) for k, v in stats.items()})
            count += weight * batch["n_loss"]
    model.train()
    keys = sorted(sums)
    reduced = sum_over_processes(run, [sums[k] for k in keys] + [count])
    return averaged(dict(zip(keys, reduced[:-1])), reduced[-1], "eval_", task.derive)


# ------------------------------------------------------------------------------------------------
# Stopping

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


def _save_or_stop(run: Run, stop: _StopFlag, done: int, steps: int, progress: _Progress) -> bool:
    """Save a resumable checkpoint every --save-steps, and when stopping; True when the loop must stop."""
    cfg = run.cfg
    stop_now = stop.signum and done < steps  # a stop at the last step just finishes
    if run.world > 1:  # every process must agree, or the checkpoint's collectives would hang
        stop_now = bool(sum_over_processes(run, [float(bool(stop_now))])[0])
    if (cfg.save_steps and done % cfg.save_steps == 0 and done < steps) or stop_now:
        save_checkpoint(run, done, {"tokens": progress.tokens, "elapsed_s": progress.elapsed()})
        progress.last_saved = done
    return bool(stop_now)


# ------------------------------------------------------------------------------------------------
# The loop

def _resume_progress(run: Run) -> _Progress:
    """Where this session starts: step 0, or the resumed checkpoint's step (its state loaded)."""
    if run.resume_from is None:
        return _Progress(start=0, tokens=0, elapsed_before=0.0)
    state = run.state
    progress = _Progress(start=int(state.get("step", 0)), tokens=int(state.get("tokens", 0)),
                         elapsed_before=float(state.get("elapsed_s", 0.0)))
    progress.last_saved = progress.start
    load_checkpoint(run, run.resume_from)
    return progress


def _log_start(run: Run, task: Task, steps: int, start: int) -> None:
    cfg, world = run.cfg, run.world
    global_batch = global_batch_size(cfg, world)
    run.metrics.write({"type": "start" if not start else "resume", "step": start, "total_steps": steps,
                       "global_batch": global_batch, "processes": world, "items": task.n_items,
                       "eval_items": task.n_eval, **run.info})
    run.log(f"{run.stage}: {steps} steps of {global_batch} {('pairs' if run.stage == 'dpo' else 'sequences')} "
            f"({cfg.batch_size} x {cfg.grad_accum} accumulation x {world} processes), {task.n_items} training items")


def _log_step(run: Run, bar, progress: _Progress, done: int, steps: int, lr: float, grad_norm, n_items: int) -> None:
    """A train record every --logging-steps (and at the first and last step of a session)."""
    if not (done % run.cfg.logging_steps == 0 or done == steps or done == progress.start + 1):
        return
    tps = progress.window_speed()
    global_batch = global_batch_size(run.cfg, run.world)
    rec = {"type": "train", "step": done, "epoch": done * global_batch / n_items, **progress.last,
           "lr": lr, "tokens": progress.tokens, "tokens_per_s": tps, "elapsed_s": progress.elapsed()}
    if grad_norm is not None:
        rec["grad_norm"] = float(grad_norm)
    run.metrics.write(rec)
    progress.postfix = {"lr": f"{lr:.2e}", "tok_s": f"{tps:,.0f}"}
    bar.set_postfix(loss=f"{progress.mean_loss():.4f}", **progress.postfix, refresh=False)
    progress.window_loss, progress.window_steps = 0.0, 0


def _eval_record(run: Run, model, task: Task, step: int, tokens: int) -> dict:
    metrics = held_out_loss(run, model, task)
    run.metrics.write({"type": "eval", "step": step, "tokens": tokens, **metrics})
    return metrics


def train_loop(run: Run, model, optimizer, task: Task) -> dict:
    """Train for the configured steps; return the summary (last train metrics, eval metrics, speed)."""
    from tqdm import tqdm

    cfg = run.cfg
    steps = total_steps(cfg, task.n_items, run.world)
    global_batch = global_batch_size(cfg, run.world)
    order = EpochOrder(task.n_items, cfg.seed, task.shuffle)
    params = [p for p in model.parameters() if p.requires_grad]
    progress = _resume_progress(run)
    _log_start(run, task, steps, progress.start)
    bar = tqdm(total=steps, initial=progress.start, desc=run.stage, unit="step",
               disable=not (cfg.progress and run.is_main), dynamic_ncols=True)
    if cfg.eval_on_start and progress.start == 0 and task.n_eval:  # the starting model: a curve's first point
        _eval_record(run, model, task, 0, 0)  # before the clock starts: not counted as training time
    progress.t_start = progress.window_start = time.perf_counter()
    try:
        with _StopFlag() as stop:
            for step in range(progress.start, steps):
                t0 = time.perf_counter()
                micro = micro_batches(run, task, order.take(step * global_batch, global_batch))
                lr = lr_at(cfg, step, steps)
                progress.last, n_tokens, grad_norm = train_step(run, model, optimizer, task, micro, lr, params)
                progress.count(step, int(n_tokens), time.perf_counter() - t0)
                done = step + 1
                _log_step(run, bar, progress, done, steps, lr, grad_norm, task.n_items)
                if progress.window_steps:  # between logged steps, the window's running mean (not a stale loss)
                    bar.set_postfix(loss=f"{progress.mean_loss():.4f}", **progress.postfix, refresh=False)
                bar.update(1)
                if cfg.eval_steps and done % cfg.eval_steps == 0 and done < steps and task.n_eval:
                    _eval_record(run, model, task, done, progress.tokens)
                for callback in STEP_CALLBACKS:
                    callback(run, done)
                if _save_or_stop(run, stop, done, steps, progress):
                    raise Terminated() if stop.signum == signal.SIGTERM else KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        if progress.last_saved > 0:
            run.log(f"stopped; the latest checkpoint is {run.work / f'checkpoint-{progress.last_saved}'} "
                    "(run the same command with --resume to continue)")
        run.metrics.close()
        raise
    bar.close()
    eval_metrics = _eval_record(run, model, task, steps, progress.tokens) if task.n_eval else {}
    return _summary(progress, steps, eval_metrics)


def _summary(progress: _Progress, steps: int, eval_metrics: dict) -> dict:
    """The loop's part of a stage's summary: final train metrics, eval metrics, speed and memory."""
    steady_speed = progress.steady_tokens / progress.steady_time if progress.steady_time else None
    return {"steps": steps, "tokens": progress.tokens, **{f"final_{k}": v for k, v in progress.last.items()},
            **eval_metrics, "tokens_per_s": steady_speed, "train_seconds": progress.elapsed(),
            "peak_rss_mb": peak_rss_mb()}
