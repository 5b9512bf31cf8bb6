"""Running a loaded recipe: every stage not already done, in order, each writing its marker; then the report."""

from __future__ import annotations

import contextlib
import datetime
import difflib
import json
import logging
import os
import shutil
import threading
import time

from upstack.config import config_from_dict, config_to_dict
from upstack.errors import ConfigError, UpstackError
from upstack.hub import hide_hub_progress_bars
from upstack.outputs import output_lock, write_file, write_text_atomic
from upstack.pipeline.fingerprint import stage_done, stage_fingerprint
from upstack.pipeline.folders import claim_stage, prepare_run_folder
from upstack.pipeline.plan import disk_need, estimate_stage
from upstack.pipeline.recipe import Recipe, Stage
from upstack.pipeline.stages import (
    DISTRIBUTED_STAGES,
    STAGE_TYPES,
    field_names,
    load_ref,
)
from upstack.report import MARKER, write_report
from upstack.train.run import IN_PIPELINE
from upstack.train.sharding import take_fsdp_from_accelerate


def _check_disk(st: Stage, need_bytes: int | None) -> None:
    if not need_bytes:
        return
    parent = st.folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need_bytes * 1.1:
        raise UpstackError(f"stage {st.name!r}: needs about {need_bytes / 1e9:.2f} GB in {parent} (its output, "
                           f"and for training its checkpoints and token files), only {free / 1e9:.2f} GB free")


def _process_state():
    """accelerate's process state when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    take_fsdp_from_accelerate()  # else, under an FSDP launch on CPU, every rank believes it is the main one
    os.environ[IN_PIPELINE] = "1"  # training stages keep the process group for the stages after them
    return PartialState(cpu=not torch.cuda.is_available())  # a CPU launch is multi-process CPU (gloo)


def check_stage_names(recipe: Recipe, from_stage: str | None, only: str | None) -> None:
    """--from/--only must name stages of the recipe (a real run and a dry run alike)."""
    names = list(recipe.stages)
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in recipe.stages:
            close = difflib.get_close_matches(value, names, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"{flag} {value!r}: no such stage ({hint}stages: {', '.join(names)})")


def _forced_stages(recipe: Recipe, from_stage: str | None, only: str | None) -> set[str]:
    """The stages --from/--only re-run even when done (checks the names, and --only's inputs)."""
    check_stage_names(recipe, from_stage, only)
    names = list(recipe.stages)
    force: set[str] = set()
    if from_stage:
        force = set(names[names.index(from_stage):])
    if only:
        force = {only}
        for dep in recipe.stages[only].deps:
            if not (recipe.stages[dep].folder / MARKER).is_file():
                raise UpstackError(f"--only {only}: its input stage {dep!r} has not completed; run it first")
    return force


def _disk_estimate(st: Stage, recipe: Recipe, sizes: dict[str, dict]) -> dict:
    """The stage's size estimate for the disk check; {} (no check) when an input cannot be estimated for a
    reason the stage itself reports when it runs: a user's mistake (UpstackError: a config.json that is no
    model, a LoRA rank too large) or a file that cannot be read (OSError). Anything else is a bug in an
    estimator, and shows: a swallowed one would turn the disk check off without a word."""
    if not STAGE_TYPES[st.type].checkpoint:
        return {}
    try:
        return estimate_stage(st, recipe, sizes)
    except (UpstackError, OSError) as e:
        logging.getLogger("upstack.pipeline").debug("stage %r: no disk estimate (%s)", st.name, e)
        return {}


def _silent(*_args) -> None:
    return None


def run_recipe(recipe: Recipe, *, from_stage: str | None = None, only: str | None = None,
               quiet: bool = False, report: bool = True, log=print) -> dict:
    """Run every stage not already done (same resolved config and inputs); write report.md after each.

    Under `accelerate launch` (WORLD_SIZE > 1) every process runs this loop: training and eval stages
    run on all processes, the others on the main process only, with a barrier after each stage; only
    the main process writes markers and reports (the run folder must be on a shared file system).
    """
    if recipe.missing:  # loaded for a dry run (missing_ok): the real run needs every input first
        raise ConfigError(f"{recipe.path}: {len(recipe.missing)} problem(s):\n  " + "\n  ".join(recipe.missing))
    state = _process_state()
    main = state is None or state.is_main_process
    if not main:
        log = _silent  # one copy of each line per launch, not one per process
    force = _forced_stages(recipe, from_stage, only)
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    # One `upstack run` per run folder: the main process holds its lock until the last stage is done. The
    # lock is taken on the real path, so a run folder given through a symbolic link takes the same lock.
    with output_lock(recipe.run_dir.resolve(), "run") if main else contextlib.nullcontext():
        return _run_stages(recipe, state, force, only, quiet, report, log)


def _run_stages(recipe: Recipe, state, force: set[str], only: str | None, quiet: bool, report: bool, log) -> dict:
    main = state is None or state.is_main_process
    hide_hub_progress_bars()  # each stage says when it starts and ends; per-file loading bars are noise here
    if main:  # a run replaces only what a run made: anything else in the way is refused before any stage runs
        prepare_run_folder(recipe, [st for st in recipe.stages.values() if not only or st.name == only])
        write_file(recipe.run_dir / "recipe.yaml", recipe.path.read_text())
    if state is not None:  # the run folder is checked before any process writes into it
        state.wait_for_everyone()
    summary = {"recipe": str(recipe.path), "run_dir": str(recipe.run_dir), "stages": {}}
    sizes: dict[str, dict] = {}
    for st in recipe.stages.values():
        sizes[st.name] = _disk_estimate(st, recipe, sizes)
        if only and st.name != only:
            continue
        if st.name not in force and stage_done(st, recipe):
            log(f"[{st.name}] up to date, skipped")
            summary["stages"][st.name] = "skipped"
            continue
        if main:
            claim_stage(recipe, st)
        if state is not None:  # no process may create the stage's folder before the main one has claimed it
            state.wait_for_everyone()
        log(f"[{st.name}] running {st.type} -> {st.folder}")
        started = time.time()
        with _heartbeat(st.name, log if main else None):
            if state is None:
                _check_disk(st, disk_need(sizes[st.name]))
                _run_stage(st, recipe, quiet)
            else:
                if main:
                    _check_disk(st, disk_need(sizes[st.name]))
                if main or st.type in DISTRIBUTED_STAGES:
                    _run_stage(st, recipe, quiet, write_marker=main)
                state.wait_for_everyone()
        log(f"[{st.name}] done in {time.time() - started:.0f} s")
        summary["stages"][st.name] = "ran"
        if report and main:
            write_report(recipe.run_dir, recipe)
    if report and main and "ran" not in summary["stages"].values():
        write_report(recipe.run_dir, recipe)  # nothing ran: the report still reflects this version's format
    return summary


HEARTBEAT_SECONDS = 30.0


@contextlib.contextmanager
def _heartbeat(name: str, log, every: float | None = None):
    """A line every `every` seconds while a stage runs, so a long stage with no progress bar is not silent."""
    if log is None:
        yield
        return
    every = every or HEARTBEAT_SECONDS
    stop = threading.Event()
    started = time.time()

    def beat():
        while not stop.wait(every):
            log(f"[{name}] still running ({time.time() - started:.0f} s)")

    thread = threading.Thread(target=beat, name=f"heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _run_stage(st: Stage, recipe: Recipe, quiet: bool, write_marker: bool = True) -> None:
    stype = STAGE_TYPES[st.type]
    cls = load_ref(stype.config)
    fn = load_ref(stype.target)
    resolved = dict(st.resolved)
    if "quiet" in field_names(cls) and quiet:
        resolved["quiet"] = True
    cfg = config_from_dict(cls, resolved, where=f"stage {st.name!r}")
    marker = st.folder / MARKER
    if write_marker and marker.exists():
        marker.unlink()
    if stype.output_file:
        st.folder.mkdir(parents=True, exist_ok=True)
    fingerprint = stage_fingerprint(st, recipe)
    started = time.time()
    result = fn(cfg)
    seconds = time.time() - started
    if not write_marker:
        return
    st.folder.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": st.name, "type": st.type, "fingerprint": fingerprint, "config": config_to_dict(cfg),
        "deps": st.deps, "seconds": round(seconds, 2),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "result": result if isinstance(result, (dict, list)) else None,
    }
    write_text_atomic(marker, json.dumps(record, indent=2, default=str) + "\n")
