"""The lm-evaluation-harness bridge: its TaskManager over our generated local tasks (and its own),
loading tasks with data errors explained, the model through its registry, and the run itself.

lm_eval is imported inside the functions: importing this module is cheap.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from pathlib import Path
from typing import Any

from upstack.errors import CheckpointError, ConfigError, DataError, UpstackError
from upstack.evaluate.config import EvalConfig
from upstack.evaluate.results import convert_results
from upstack.evaluate.tasks.registry import (  # fewshot_for: re-exported
    H6_BY_TASK,
    LOCAL_TASKS,
    PRESETS,
    fewshot_for,
    known_task_names,
)
from upstack.hub import go_offline, hub_offline, hub_reachable
from upstack.lm import (
    DEFAULT_MAX_POSITIONS,
    cpu_only_launch,
    max_positions,
    model_config,
    resolve_device,
)


def load_lm(cfg: EvalConfig):
    from lm_eval.api.registry import get_model

    args: dict[str, Any] = {"pretrained": cfg.model, "dtype": cfg.dtype, "trust_remote_code": False}
    if cfg.max_length:
        args["max_length"] = cfg.max_length
    if cfg.backend == "vllm":
        if cfg.max_length:
            args["max_model_len"] = args.pop("max_length")
        args["seed"] = cfg.seed
    args.update(cfg.model_args)
    device = None if cfg.backend == "vllm" else resolve_device(cfg.device)
    if cfg.backend == "hf" and cpu_only_launch():  # lm-eval's Accelerator() then joins this CPU process group
        from accelerate import PartialState

        PartialState(cpu=True)
    try:
        return _data_parallel_on_cpu(get_model(cfg.backend).create_from_arg_obj(
            args, {"batch_size": cfg.batch_size, "max_batch_size": 64, "device": device}))
    except UpstackError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load model {cfg.model}: {msg}") from e


def _data_parallel_on_cpu(lm):
    """lm-eval's HF model splits the requests across `accelerate launch` processes only when it counts
    GPUs; on CPU processes it keeps the launch's Accelerator but leaves rank 0 of 1 in every process, so each
    scored every document and returned results. Give it the launch's ranks: each process scores its share,
    lm-eval gathers them on the main process, which alone returns results."""
    acc = getattr(lm, "accelerator", None)
    if acc is not None and acc.num_processes > 1 and lm.world_size == 1:
        lm._rank, lm._world_size = acc.process_index, acc.num_processes
    return lm


def _scored_docs(task, limit) -> int:
    """How many documents of `task` lm-eval scores under `limit` (its own rule: a count, or a fraction < 1)."""
    n = len(task.eval_docs)
    if limit is None:
        return n
    return min(n, int(math.ceil(n * limit)) if limit < 1.0 else int(limit))


def _fewshot_as_one_process(task) -> None:
    """Under data parallelism lm-eval builds each process's share of the documents with the task's one
    few-shot sampler, whose random draws then follow that share: document 2 gets the second draw on rank 0
    of 2 and the third in one process, so scores change with the number of processes (lm-eval issue
    #1719). Build every document's request as one process would, then keep this process's share (the
    documents lm-eval would give it: doc_id = rank mod world size)."""
    build = task.build_all_requests

    def build_all_requests(*args, rank: int = 0, world_size: int = 1, **kwargs):
        build(*args, rank=0, world_size=1, **kwargs)
        if world_size > 1:
            task._instances = [i for i in task._instances if i.doc_id % world_size == rank]

    task.build_all_requests = build_all_requests


def task_manager(tmp: Path, names: list[str]):
    """A TaskManager over our generated local tasks and, as needed, the harness's own tasks.

    Indexing all of lm-eval's ~15k task files takes ~10 s, so for the six leaderboard tasks only
    their folders are indexed; the full index is built only for other task names.
    """
    import lm_eval.tasks as lm_tasks
    from lm_eval.tasks import TaskManager

    ours = set(LOCAL_TASKS) | set(PRESETS)
    others = [n for n in names if n not in ours]
    if not others:
        return TaskManager(include_path=str(tmp), include_defaults=False)
    builtin = Path(lm_tasks.__file__).parent
    h6_dirs = {"arc_challenge": "arc", "hellaswag": "hellaswag", "mmlu": "mmlu/default",
               "truthfulqa_mc2": "truthfulqa", "winogrande": "winogrande", "gsm8k": "gsm8k"}
    if all(n in h6_dirs for n in others):
        paths = sorted({str(builtin / h6_dirs[n]) for n in others}) + [str(tmp)]
        return TaskManager(include_path=paths, include_defaults=False)
    tm = TaskManager(include_path=str(tmp))
    unknown = [n for n in others if n not in tm.all_tasks]
    if unknown:
        pool = list(tm.all_tasks) + known_task_names()
        hints = sorted({m for n in unknown for m in difflib.get_close_matches(n, pool, n=3)})
        raise ConfigError(
            f"unknown task(s) {', '.join(unknown)}; known: {', '.join(known_task_names())}"
            + (f"; did you mean {', '.join(hints)}?" if hints else "")
            + " (or any lm-evaluation-harness task: `lm-eval ls tasks`)")
    return tm


def load_tasks(tm, names: list[str]):
    """[top-level Task/Group objects] and {leaf task name: Task} for `names`; data loading errors explained."""
    top, leaves = [], {}
    unreachable = False
    if any(n not in LOCAL_TASKS and n not in PRESETS for n in names) and not hub_offline() and not hub_reachable():
        go_offline()  # the datasets library would retry the Hub for ~25 s before failing: use the cache alone
        unreachable = True
    for name in names:
        try:
            loaded = tm.load([name])
        except UpstackError:
            raise
        except Exception as e:  # dataset download / cache problems surface as many exception types
            local = H6_BY_TASK[name].local if name in H6_BY_TASK and name not in LOCAL_TASKS else None
            alt = (f"; score the local copy instead: --tasks {local} --data-dir DIR (layout in docs/evaluation.md)"
                   if local else "; local tasks: " + ", ".join(LOCAL_TASKS))
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if unreachable:
                raise DataError(f"task {name}: its data are not in the local Hugging Face cache and the Hub "
                                f"({os.environ.get('HF_ENDPOINT', 'huggingface.co')}) cannot be reached{alt}") from e
            if hub_offline():
                raise DataError(f"task {name}: its data are not in the local Hugging Face cache and we are offline "
                                f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set; {why[:200]}){alt}") from e
            raise DataError(f"task {name}: cannot load its data ({why[:200]}){alt}") from e
        if name in loaded["groups"]:
            top.append(loaded["groups"][name])
        elif name in loaded["tasks"]:
            top.append(loaded["tasks"][name])
        else:  # a tag: its tasks
            top += list(loaded["tasks"].values())
        for t in loaded["tasks"].values():
            leaves[t.task_name] = (name, t)
    return top, leaves


class _DropCustomDatasetNote(logging.Filter):
    """lm-eval warns, for every task with a `custom_dataset`, how to pass it kwargs (ours are handled), and
    whenever generation settings come "through cli" (ours: the max_gen_toks budget, chosen on purpose)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Custom kwargs can be passed" not in msg and "specified through cli" not in msg


class _CountTruncations(logging.Filter):
    """lm-eval warns once per request whose prompt is truncated; let the first through and count the rest."""

    count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg.startswith("Left truncation applied") or ("exceeds model's maximum length" in msg):
            self.count += 1
            return self.count == 1
        return True


NOTE_FILTER = _DropCustomDatasetNote()
TRUNCATIONS = _CountTruncations()


def _quiet_git_hash() -> str | None:
    """lm-eval's commit-hash probe (`git describe --always`) with git's stderr kept: outside a repository
    git prints `fatal: not a git repository`, which is noise to a user scoring a model."""
    import subprocess

    try:
        done = subprocess.run(["git", "describe", "--always"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode(errors="replace").strip() or None if done.returncode == 0 else None


def _silence_lm_eval() -> None:
    """lm-eval passes `disable=` to tqdm explicitly (so TQDM_DISABLE is ignored): turn it off for --quiet."""
    import logging

    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.evaluator
    import lm_eval.models.huggingface as hf_mod
    from tqdm import tqdm as _tqdm

    def quiet_tqdm(*args, **kwargs):
        kwargs["disable"] = True
        return _tqdm(*args, **kwargs)

    for mod in (hf_mod, lm_eval.evaluator, lm_eval.api.model, lm_eval.api.task):
        if hasattr(mod, "tqdm"):
            mod.tqdm = quiet_tqdm
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def run_harness(cfg: EvalConfig, lm, tm, top: list, names: list[str]) -> dict:
    import lm_eval
    import lm_eval.evaluator

    lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash
    if cfg.quiet:
        _silence_lm_eval()
    elif logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)  # its INFO lines (about 9 a run) are noise here

    gen_kwargs = None
    if any(t.get_config("output_type") == "generate_until" for t in _leaf_tasks(top)):
        budget = cfg.max_gen_toks
        if budget is None:
            ctx = (cfg.max_length or getattr(lm, "max_length", None) or max_positions(model_config(cfg.model) or {})
                   or DEFAULT_MAX_POSITIONS)
            budget = min(256, max(16, ctx // 4))
        gen_kwargs = {"max_gen_toks": budget}
    scores_alone = False  # this process scores everything, but is not the one that reports
    if getattr(lm, "world_size", 1) > 1:
        leaves = _leaf_tasks(top)
        if min(_scored_docs(t, cfg.limit) for t in leaves) < lm.world_size:
            # a process would get no document of some task, which lm-eval cannot handle: every process
            # scores everything as one process would (the same numbers) and the main one alone reports
            scores_alone = lm.rank != 0
            lm._rank, lm._world_size = 0, 1
        else:
            for task in leaves:
                _fewshot_as_one_process(task)
    res = lm_eval.simple_evaluate(
        model=lm, tasks=top, num_fewshot=None, limit=cfg.limit, task_manager=tm, gen_kwargs=gen_kwargs,
        log_samples=cfg.log_samples, apply_chat_template=cfg.apply_chat_template, random_seed=cfg.seed,
        numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    if res is None or scores_alone:  # not the main process under accelerate launch
        return {"_not_main": True}
    out = convert_results(res, names)
    if cfg.log_samples:
        out["_samples"] = res.get("samples") or {}
    return out


def write_samples(samples: dict[str, list], output: str | Path) -> dict[str, str]:
    """lm-eval's per-document records, one `samples_<task>_<time>.jsonl` per task beside `output`, written
    by lm-eval's own EvaluationTracker (as `lm-eval --log_samples` writes them); return {task: path}.

    The tracker appends to its files, so it writes into a temporary folder and each file is then renamed
    into place complete.
    """
    import datetime as dt
    import os
    import tempfile

    from lm_eval.loggers import EvaluationTracker

    folder = Path(output).parent
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    with tempfile.TemporaryDirectory(prefix=".upstack-samples-", dir=folder) as tmp:
        tracker = EvaluationTracker(output_path=str(Path(tmp) / "results.json"))
        tracker.date_id = dt.datetime.now().isoformat().replace(":", "-")  # as save_results_aggregated sets it
        for task, records in samples.items():
            tracker.save_results_samples(task_name=task, samples=records)
            name = f"samples_{task}_{tracker.date_id}.jsonl"
            if (Path(tmp) / name).is_file():
                os.replace(Path(tmp) / name, folder / name)
                written[task] = str(folder / name)
    return written


def _leaf_tasks(top: list) -> list:
    from lm_eval.api.group import Group

    out = []
    for obj in top:
        out += obj.get_all_tasks() if isinstance(obj, Group) else [obj]
    return out
