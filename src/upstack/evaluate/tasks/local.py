"""Local tasks: which files a local task scores (from --data-dir or --task-file), validated, and the
small per-run task YAML that `include`s the shipped template and names those files."""

from __future__ import annotations

import re
from pathlib import Path

from upstack.data.benchmarks import load_docs, mmlu_subject
from upstack.errors import ConfigError, DataError
from upstack.evaluate.config import EvalConfig
from upstack.evaluate.tasks.registry import LOCAL_TASKS, TASK_YAML_DIR, fewshot_for

_EXTS = {"mmlu": (".csv",), "truthfulqa": (".json", ".jsonl")}


def _kind(path: Path) -> str:
    name = path.name.lower()
    if "test" in name:
        return "test"
    if re.search(r"(^|[^a-z])val", name):
        return "val"
    if "dev" in name:
        return "dev"
    if "train" in name:
        return "train"
    return "other"


def _pick(files: list[Path], order: tuple[str, ...]) -> Path | None:
    for kind in order:
        matches = [f for f in files if _kind(f) == kind]
        if matches:
            # Several candidates of one kind (winogrande train_xs ... train_xl): take the largest.
            return max(matches, key=lambda f: (f.stat().st_size, f.name))
    return None


def _data_files(folder: Path, fmt: str) -> list[Path]:
    exts = _EXTS.get(fmt, (".jsonl", ".json"))
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts)


def _resolve_mmlu(root: Path, fewshot_root: Path | None, order: tuple[str, ...]) -> list[tuple[str, Path, Path]]:
    """[(subject, eval csv, few-shot csv)] from an MMLU folder (dev/ val/ test/ subfolders or flat CSVs) or one CSV."""
    if root.is_file():
        subject = mmlu_subject(root)
        dev = [root.parent.parent / "dev" / f"{subject}_dev.csv", root.parent / f"{subject}_dev.csv"]
        fs = fewshot_root if fewshot_root and fewshot_root.is_file() else next((d for d in dev if d.is_file()), root)
        return [(subject, root, fs)]
    csvs = sorted(root.rglob("*.csv"))
    if not csvs:
        raise DataError(f"{root}: no MMLU .csv files (expected dev/, val/ or test/ subfolders of <subject>_<split>.csv)")
    by_kind: dict[str, list[Path]] = {}
    for f in csvs:
        kind = _kind(f) if _kind(f) != "other" else _kind(f.parent)
        by_kind.setdefault(kind, []).append(f)
    eval_files = next((by_kind[k] for k in order if k in by_kind), None) or by_kind.get("train", [])
    if fewshot_root and fewshot_root.is_file():
        raise DataError(f"{fewshot_root}: with an MMLU folder, --fewshot-file mmlu_local= must be a folder of "
                        "<subject>_dev.csv files")
    fs_pool = sorted(fewshot_root.rglob("*.csv")) if fewshot_root else by_kind.get("dev", [])
    fewshot = {mmlu_subject(f): f for f in fs_pool}
    return [(mmlu_subject(f), f, fewshot.get(mmlu_subject(f), f)) for f in eval_files]


def resolve_local_files(task: str, cfg: EvalConfig) -> list[tuple[str, Path, Path]]:
    """[(task name, scored file, few-shot file)] of a local task; MMLU gives one entry per subject."""
    spec = LOCAL_TASKS[task]
    override = cfg.task_files.get(task)
    fs_override = Path(cfg.fewshot_files[task]) if task in cfg.fewshot_files else None
    if fs_override is not None and not fs_override.exists():
        raise DataError(f"{fs_override}: few-shot file for {task} not found")
    if override:
        root = Path(override)
        if not root.exists():
            raise DataError(f"{root}: file for {task} not found")
    elif cfg.data_dir:
        root = Path(cfg.data_dir) / spec.folder
        if not root.is_dir():
            raise DataError(f"{root}: no such folder; {task} reads its files from <data-dir>/{spec.folder}/ "
                            f"(or name a file with --task-file {task}=PATH)")
    else:
        raise ConfigError(f"task {task} needs local data: --data-dir DIR or --task-file {task}=PATH")

    if spec.format == "mmlu":
        return [(f"mmlu_local_{s}", e, f) for s, e, f in _resolve_mmlu(root, fs_override, spec.eval_order)]
    if root.is_file():
        eval_file = root
        fewshot = fs_override or root
    else:
        files = _data_files(root, spec.format)
        eval_file = _pick(files, spec.eval_order)
        if eval_file is None:
            raise DataError(f"{root}: no {' or '.join(_EXTS.get(spec.format, ('.jsonl', '.json')))} file for {task}")
        if fs_override:
            fewshot = fs_override
        else:
            fewshot = _pick([f for f in files if f != eval_file], spec.fewshot_order) or eval_file
    return [(task, eval_file, fewshot)]


def write_local_tasks(tmp: Path, task: str, cfg: EvalConfig) -> dict[str, dict[str, str]]:
    """Validate the files of one local task and write its task YAML(s) into `tmp`; return the files used."""
    import yaml

    spec = LOCAL_TASKS[task]
    entries = resolve_local_files(task, cfg)
    used = {}
    short = []
    for name, eval_file, fewshot in entries:
        rows = len(load_docs(spec.format, eval_file))  # validate every row now, before any model is loaded
        if fewshot != eval_file:
            rows = len(load_docs(spec.format, fewshot))
        same = fewshot.resolve() == eval_file.resolve()
        problem = _too_few_fewshot_rows(task, name, cfg, fewshot, rows, same and bool(spec.fewshot_order))
        if problem:
            short.append(problem)
        doc = {
            "include": str(TASK_YAML_DIR / spec.template),
            "task": name,
            "dataset_kwargs": {"eval_file": str(eval_file.resolve()),
                               "fewshot_file": None if same else str(fewshot.resolve())},
        }
        if spec.fewshot_order:  # (TruthfulQA is 0-shot: no few-shot split)
            # Few-shot examples from the scored file itself: the harness then leaves the scored document out.
            doc["fewshot_split"] = "test" if same else "train"
        if spec.format == "mmlu":
            subject = name[len("mmlu_local_"):]
            doc["task_alias"] = subject
            doc["description"] = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
        used[name] = {"eval": str(eval_file), "fewshot": str(fewshot)}
    if short:
        more = f" (and {len(short) - 1} more subject(s) of {task})" if len(short) > 1 else ""
        raise DataError(short[0] + more)
    if spec.format == "mmlu":
        group = {"group": task, "task": [n for n, _, _ in entries],
                 "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
        (tmp / f"{task}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return used


def _too_few_fewshot_rows(task: str, name: str, cfg: EvalConfig, fewshot: Path, rows: int, leave_out: bool) -> str | None:
    """Why `name` cannot draw its few-shot examples from `rows` rows of `fewshot`, else None. lm-eval would
    stop mid-run with `ValueError: Sample larger than population`: from the scored file it draws the
    examples among the other rows (leave_out: one more row needed); from a few-shot file, among all."""
    shots = fewshot_for(task, name, cfg, None)
    need = shots + 1 if leave_out else shots
    if rows >= need:
        return None
    at_most = max(rows - 1 if leave_out else rows, 0)
    source = (f"{rows} row(s) in {fewshot}, the scored file (its examples leave the scored row out)" if leave_out
              else f"{rows} row(s) in the few-shot file {fewshot}")
    fewer = f"--num-fewshot {task}=0" + (f" (or up to {at_most})" if at_most else "")
    label = name if name == task else f"{name} ({task})"
    return (f"{label}: {shots}-shot needs {need} rows, found {source}; pass {fewer}, or "
            f"--fewshot-file {task}=FILE with at least {shots} rows")
