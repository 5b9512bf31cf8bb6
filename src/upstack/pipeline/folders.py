"""What `upstack run` may replace in its run folder: only what a run made.

A stage folder is a run's when it holds its stage marker (a finished stage), or when the run folder's
record (`.upstack_run.json`) lists it: a run records each stage there before the stage starts, so a
stage killed or failed before its marker was written stays the run's. `recipe.yaml`, `report.md`,
`results.json` and the plots are a run's when the run folder is (it has the record, or, made by an older
upstack, a stage folder with a marker). Anything else in the way is refused before any stage runs, one
line naming it; so is a symbolic link where the run writes (it would write through it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from upstack.errors import UpstackError
from upstack.outputs import LinkRefusedError, refuse_link, write_file
from upstack.pipeline.recipe import Recipe, Stage
from upstack.pipeline.stages import STAGE_TYPES
from upstack.report import MARKER
from upstack.report_plots import PLOT_INDEX, PLOTS, TOKENS_PLOT

RUN_RECORD = ".upstack_run.json"
RUN_FILES = ("recipe.yaml", "report.md", "results.json", PLOT_INDEX, TOKENS_PLOT, *(p[0] for p in PLOTS))
# stage types that keep a work folder `<stage>.work` beside their output (checkpoints, token files)
WORK_FOLDER_TYPES = {"base"} | {n for n, t in STAGE_TYPES.items() if "resume" in t.pipeline_fields}


class FolderInTheWayError(UpstackError):
    """A file or folder where a run would write, which no run made."""


def _regular_file(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def _recorded(run_dir: Path) -> list[str] | None:
    """The stages the run folder's record lists; None without a record."""
    record = run_dir / RUN_RECORD
    if not _regular_file(record):
        return None
    try:
        stages = json.loads(record.read_text()).get("stages")
    except (OSError, ValueError, AttributeError):
        return []
    return [s for s in stages if isinstance(s, str)] if isinstance(stages, list) else []


def _made_by_a_run(run_dir: Path) -> bool:
    if _recorded(run_dir) is not None:
        return True
    try:
        return any(_regular_file(d / MARKER) for d in run_dir.iterdir() if d.is_dir() and not d.is_symlink())
    except OSError:
        return False


def _check_stage_folder(st: Stage, recorded: list[str]) -> None:
    folder = st.folder
    paths = [folder] + ([folder.parent / f"{folder.name}.work"] if st.type in WORK_FOLDER_TYPES else [])
    for p in paths:
        if not os.path.lexists(p):
            continue
        refuse_link(p, f"stage {st.name!r} writes its output there")
        if not p.is_dir():
            raise FolderInTheWayError(f"{p} is in the way of stage {st.name!r}: it is not a folder a run made "
                                      f"(move it away, or choose another --out)")
        ours = st.name in recorded or _regular_file(p / (MARKER if p == folder else "run.json"))
        if not ours:
            raise FolderInTheWayError(f"{p} exists and was not made by upstack run (no {MARKER}); stage "
                                      f"{st.name!r} would replace it: move it away, or choose another --out")


def _write_record(run_dir: Path, stages: list[str]) -> None:
    write_file(run_dir / RUN_RECORD, json.dumps({"made_by": "upstack run", "stages": stages}, indent=1) + "\n")


def prepare_run_folder(recipe: Recipe, stages: list[Stage]) -> None:
    """Before any stage runs: refuse (one line) a stage folder of `stages` that no run made, a run file
    (recipe.yaml, report.md, results.json, plots) in a folder no run made, and any symbolic link there;
    then mark the run folder as a run's (its record)."""
    run_dir = recipe.run_dir
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise FolderInTheWayError(f"{run_dir} is not a folder; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    made = _made_by_a_run(run_dir)
    for name in (RUN_RECORD, *RUN_FILES):
        p = run_dir / name
        if not os.path.lexists(p):
            continue
        refuse_link(p, "upstack run writes this file")
        if not _regular_file(p) or not made:
            raise FolderInTheWayError(f"{p} exists and was not written by upstack run ({run_dir} is no run "
                                      f"folder); move it away, or choose another --out")
    recorded = _recorded(run_dir)
    for st in stages:
        _check_stage_folder(st, recorded or [])
    if recorded is None:
        _write_record(run_dir, [])


def claim_stage(recipe: Recipe, st: Stage) -> None:
    """Just before a stage runs: check its folder again, and record in the run folder that a run writes it."""
    recorded = _recorded(recipe.run_dir) or []
    _check_stage_folder(st, recorded)
    if st.name not in recorded:
        _write_record(recipe.run_dir, [*recorded, st.name])


__all__ = ["RUN_FILES", "RUN_RECORD", "FolderInTheWayError", "LinkRefusedError", "claim_stage", "prepare_run_folder"]
