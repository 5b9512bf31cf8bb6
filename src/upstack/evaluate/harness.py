"""`evaluate`: score a checkpoint with lm-evaluation-harness, on the real leaderboard tasks or on local files.

The real tasks (`arc_challenge`, `hellaswag`, `mmlu`, `truthfulqa_mc2`, `winogrande`, `gsm8k`, or any
other lm-eval task name) load their data from the Hugging Face Hub or its cache. The local tasks
(`*_local`) are the same harness tasks reading the benchmarks' own file formats from a folder
(`data_dir`, laid out like ../shared/data) or from files named per task (`task_files`): for each run we
write into a temporary folder one small YAML per task that `include`s the template shipped in
`upstack/evaluate/tasks/` and names the files, and hand that folder to lm-eval's TaskManager.

The H6 preset scores the six Open LLM Leaderboard v1 tasks with the leaderboard's few-shot counts
and metrics; the H6 score is their plain mean.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from upstack.errors import CheckpointError, ConfigError, DataError, UpstackError
from upstack.data.benchmarks import load_docs, mmlu_subject
from upstack.data.chat import TEMPLATES as CHAT_TEMPLATES
from upstack.hub import hub_offline
from upstack.lm import (
    DEFAULT_MAX_POSITIONS, check_model_path, load_for_inference, max_positions, model_config, resolve_device,
)
from upstack.outputs import write_text_atomic

log = logging.getLogger(__name__)

RESULTS_FORMAT = "upstack-eval/1"
TASK_YAML_DIR = Path(__file__).parent / "tasks"  # the local tasks' YAML templates


@dataclass(frozen=True)
class H6Task:
    benchmark: str  # short name used in the H6 table
    task: str  # lm-eval task (Hugging Face data)
    local: str  # upstack local task (files)
    metric: str  # the leaderboard metric key in our results ("metric" or "metric,filter")
    num_fewshot: int


H6 = (
    H6Task("arc", "arc_challenge", "arc_challenge_local", "acc_norm", 25),
    H6Task("hellaswag", "hellaswag", "hellaswag_local", "acc_norm", 10),
    H6Task("mmlu", "mmlu", "mmlu_local", "acc", 5),
    H6Task("truthfulqa", "truthfulqa_mc2", "truthfulqa_mc2_local", "acc", 0),
    H6Task("winogrande", "winogrande", "winogrande_local", "acc", 5),
    H6Task("gsm8k", "gsm8k", "gsm8k_local", "exact_match,strict-match", 5),
)
H6_BY_TASK = {t.task: t for t in H6} | {t.local: t for t in H6}


@dataclass(frozen=True)
class LocalTask:
    """Where a local task finds its files inside --data-dir, and in which format it reads them."""

    format: str
    folder: str
    template: str
    eval_order: tuple[str, ...]  # file kinds tried in order for the scored split
    fewshot_order: tuple[str, ...]  # file kinds tried in order for few-shot examples (else the scored file)


# File kinds by name: "test", "val" (val/valid/validation), "dev", "train", "other". Winogrande's and
# HellaSwag's public test files have no labels, so those tasks never pick a test file by themselves;
# MMLU's dev files are its few-shot examples.
LOCAL_TASKS = {
    "arc_challenge_local": LocalTask("arc", "arc_challenge", "arc_challenge_local.yaml",
                                     ("test", "dev", "val", "other", "train"), ("train",)),
    "hellaswag_local": LocalTask("hellaswag", "hellaswag", "hellaswag_local.yaml",
                                 ("val", "dev", "other", "train"), ("train",)),
    "mmlu_local": LocalTask("mmlu", "mmlu", "mmlu_local.yaml", ("test", "val", "other", "dev"), ("dev",)),
    "truthfulqa_mc2_local": LocalTask("truthfulqa", "truthfulqa", "truthfulqa_mc2_local.yaml",
                                      ("other", "test", "val", "dev", "train"), ()),
    "winogrande_local": LocalTask("winogrande", "winogrande", "winogrande_local.yaml",
                                  ("dev", "val", "other", "train"), ("train",)),
    "gsm8k_local": LocalTask("gsm8k", "gsm8k", "gsm8k_local.yaml", ("test", "val", "dev", "other", "train"),
                             ("train",)),
}
PRESETS = {"h6": [t.task for t in H6], "h6_local": [t.local for t in H6]}
_EXTS = {"mmlu": (".csv",), "truthfulqa": (".json", ".jsonl")}


@dataclass
class EvalConfig:
    """What `upstack eval` runs. Field names match the CLI flags and the recipe's `evaluate:` section."""

    model: str
    tasks: list[str] = field(default_factory=list)  # names or comma lists; 'h6' is the leaderboard preset
    data_dir: str | None = None  # folder laid out like ../shared/data: use the local tasks
    task_files: dict[str, str] = field(default_factory=dict)  # local task -> file (or MMLU folder) to score
    fewshot_files: dict[str, str] = field(default_factory=dict)  # local task -> file of few-shot examples
    num_fewshot: int | None = None  # for every task (default: the leaderboard's count for H6 tasks)
    task_fewshot: dict[str, int] = field(default_factory=dict)  # per-task few-shot override
    limit: int | float | None = None  # documents per task (a fraction if < 1)
    batch_size: int | str = 8  # or "auto"
    device: str | None = None  # default: cuda if available, else cpu
    backend: Literal["hf", "vllm"] = "hf"
    model_args: dict[str, Any] = field(default_factory=dict)  # extra backend arguments (e.g. tensor_parallel_size)
    dtype: str = "auto"
    max_length: int | None = None  # context length (default: the model's)
    max_gen_toks: int | None = None  # generation budget (default: 256, less for short-context models)
    apply_chat_template: bool = False
    seed: int = 1234
    perplexity: list[str] = field(default_factory=list)  # text/JSONL files to score with a sliding window
    text_field: str = "text"
    stride: int | None = None
    preference: list[str] = field(default_factory=list)  # (prompt, chosen, rejected) files: preference accuracy
    preference_reference: str | None = None  # model whose log-probs give the DPO implicit reward (e.g. the SFT model)
    preference_group: str | None = None  # row field to break preference metrics down by (e.g. kind)
    template: str = "auto"  # chat template for --preference: auto | chat | alpaca (as for sft/dpo)
    output: str | None = None  # results JSON (a markdown table is written next to it, .md)
    quiet: bool = False  # no progress bars or info logs from lm-eval


# ------------------------------------------------------------------------------------ task names
def _split_names(names: list[str]) -> list[str]:
    out = []
    for item in names:
        out += [n.strip() for n in str(item).split(",") if n.strip()]
    return out


def expand_tasks(cfg: EvalConfig) -> list[str]:
    """Task names after expanding comma lists and presets; 'h6' means the local six when data are local."""
    local_data = bool(cfg.data_dir or cfg.task_files)
    out: list[str] = []
    for name in _split_names(cfg.tasks):
        if name == "h6" and local_data:
            name = "h6_local"
        for n in PRESETS.get(name, [name]):
            if n not in out:
                out.append(n)
    return out


def known_task_names() -> list[str]:
    return list(PRESETS) + [t.task for t in H6] + list(LOCAL_TASKS)


# ------------------------------------------------------------------------------- local task files
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


def _write_local_tasks(tmp: Path, task: str, cfg: EvalConfig) -> dict[str, dict[str, str]]:
    """Validate the files of one local task and write its task YAML(s) into `tmp`; return the files used."""
    import yaml


    spec = LOCAL_TASKS[task]
    entries = resolve_local_files(task, cfg)
    used = {}
    for name, eval_file, fewshot in entries:
        load_docs(spec.format, eval_file)  # validate every row now, before any model is loaded
        if fewshot != eval_file:
            load_docs(spec.format, fewshot)
        same = fewshot.resolve() == eval_file.resolve()
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
    if spec.format == "mmlu":
        group = {"group": task, "task": [n for n, _, _ in entries],
                 "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
        (tmp / f"{task}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    return used


# ---------------------------------------------------------------------------------- the model
def _load_lm(cfg: EvalConfig):
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
    try:
        return get_model(cfg.backend).create_from_arg_obj(
            args, {"batch_size": cfg.batch_size, "max_batch_size": 64, "device": device})
    except UpstackError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load model {cfg.model}: {msg}") from e


# ---------------------------------------------------------------------------------- tasks
def _task_manager(tmp: Path, names: list[str]):
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


def _check_names(names: list[str]) -> None:
    """Reject names that are obviously not tasks before indexing lm-eval (e.g. a local name misspelt)."""
    for n in names:
        if n.endswith("_local") and n not in LOCAL_TASKS:
            close = difflib.get_close_matches(n, list(LOCAL_TASKS), n=1)
            raise ConfigError(f"unknown task {n}; local tasks are {', '.join(LOCAL_TASKS)}"
                              + (f" (did you mean {close[0]}?)" if close else ""))


def _load_tasks(tm, names: list[str]):
    """[top-level Task/Group objects] and {leaf task name: Task} for `names`; data loading errors explained."""
    top, leaves = [], {}
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


def _fewshot_for(top_name: str, leaf_name: str, cfg: EvalConfig, default: int | None) -> int | None:
    for key in (leaf_name, top_name):
        if key in cfg.task_fewshot:
            return cfg.task_fewshot[key]
    if cfg.num_fewshot is not None:
        return cfg.num_fewshot
    if top_name in H6_BY_TASK:
        return H6_BY_TASK[top_name].num_fewshot
    return default if default is not None else 0


# ------------------------------------------------------------------------------- results
def _metric_key(key: str) -> str | None:
    """lm-eval 'acc,none' -> 'acc'; 'exact_match,strict-match' stays; other keys (alias, ...) -> None."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    return metric if filt == "none" else f"{metric},{filt}"


def _convert(res: dict, names: list[str]) -> dict:
    results = {}
    for task, metrics in res.get("results", {}).items():
        row = {}
        for k, v in metrics.items():
            mk = _metric_key(k)
            if mk is not None:
                row[mk] = None if v in ("N/A", None) else float(v)
        results[task] = row
    groups = {g: list(subs) for g, subs in res.get("group_subtasks", {}).items() if subs}
    n_samples = {t: dict(v) for t, v in res.get("n-samples", {}).items()}
    for g, subs in groups.items():
        n_samples[g] = {k: sum(n_samples.get(s, {}).get(k, 0) for s in subs) for k in ("original", "effective")}
    shots = {t: v for t, v in res.get("n-shot", {}).items()}
    for g, subs in groups.items():
        vals = {shots.get(s) for s in subs}
        if len(vals) == 1:
            shots[g] = vals.pop()
    return {"results": results, "groups": groups, "n_samples": n_samples, "num_fewshot": shots,
            "tasks": names}


def h6_score(results: dict) -> dict | None:
    """The H6 mean when all six leaderboard tasks (real or local) were scored, else None."""
    parts = {}
    for t in H6:
        for name in (t.task, t.local):
            value = results.get(name, {}).get(t.metric)
            if value is not None:
                parts[t.benchmark] = {"task": name, "metric": t.metric, "value": value}
                break
    if len(parts) < len(H6):
        return None
    return {"score": sum(p["value"] for p in parts.values()) / len(parts), "tasks": parts}


def primary_metrics(task: str, row: dict) -> list[str]:
    """The metric(s) a table shows for a task: the leaderboard one for H6 tasks, else all but stderr."""
    if task in H6_BY_TASK:
        return [H6_BY_TASK[task].metric]
    return [k for k in row if "_stderr" not in k]


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.4f}"


PREFERENCE_METRICS = ("accuracy", "margin", "reward_accuracy")  # shown in tables; results JSON has them all


def preference_parts(p: dict) -> list[tuple[str, dict]]:
    """One preference result as ("", whole file) then ("[group]", metrics) per group (tables, report)."""
    groups = p.get("groups") or {}
    return [("", p)] + [(f"[{g}]", q) for g, q in groups.items() if isinstance(q, dict)]


def _preference_rows(name: str, p: dict) -> list[tuple[str, dict]]:
    """Table rows of one preference result: the whole file, then each group."""
    return [(f"pref: {name} {g}".rstrip(), q) for g, q in preference_parts(p)]


def markdown_table(out: dict) -> str:
    """A markdown table of one results dict: requested tasks (groups, not their subtasks), H6, perplexity."""
    lines = [f"Model: `{out.get('model')}`  ", f"Date: {out.get('date')}", "",
             "| task | metric | value | stderr | docs | shots |", "|---|---|---:|---:|---:|---:|"]
    results = out.get("results", {})
    shown = [t for t in out.get("tasks", []) if t in results]
    shown += [t for t in results if t not in shown and t not in {s for v in out.get("groups", {}).values() for s in v}]
    for task in shown:
        row = results[task]
        n = out.get("n_samples", {}).get(task, {})
        for m in primary_metrics(task, row):
            metric, _, filt = m.partition(",")
            stderr = row.get(f"{metric}_stderr" + (f",{filt}" if filt else ""))
            docs = n.get("effective", "")
            if n and n.get("original") != n.get("effective"):
                docs = f"{n.get('effective')}/{n.get('original')}"
            lines.append(f"| {task} | {m} | {_fmt(row.get(m))} | {_fmt(stderr) if stderr is not None else ''} "
                         f"| {docs} | {out.get('num_fewshot', {}).get(task, '')} |")
    if out.get("h6"):
        lines.append(f"| **H6** | mean of 6 | **{_fmt(out['h6']['score'])}** | | | |")
    for path, p in out.get("perplexity", {}).items():
        lines.append(f"| ppl: {Path(path).name} | perplexity | {p['perplexity']:.4f} | | {p['documents']} | |")
    for path, p in out.get("preference", {}).items():
        for label, q in _preference_rows(Path(path).name, p):
            for m in PREFERENCE_METRICS:
                if m in q:
                    lines.append(f"| {label} | {m} | {q[m]:.4f} | | {q['scored']} | |")
    return "\n".join(lines) + "\n"


def compare(files: list[str]) -> dict:
    """Side-by-side view of several results files: {"columns": [...], "rows": [{"task", "metric", "values"}]}."""
    runs = []
    for f in files:
        try:
            data = json.loads(Path(f).read_text())
        except FileNotFoundError:
            raise DataError(f"{f}: file not found") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: not a JSON results file ({e})") from None
        if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
            raise DataError(f"{f}: not an `upstack eval` results file (no \"format\": \"{RESULTS_FORMAT}\")")
        runs.append(data)
    labels = [Path(str(r.get("model", ""))).name or Path(f).stem for r, f in zip(runs, files)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({Path(f).stem})" for lab, f in zip(labels, files)]
    keys: list[tuple[str, str]] = []
    for r in runs:
        grouped = {s for v in r.get("groups", {}).values() for s in v}
        for task in [t for t in r.get("tasks", []) if t in r["results"]] + list(r["results"]):
            if task in grouped:
                continue
            for m in primary_metrics(task, r["results"][task]):
                if (task, m) not in keys:
                    keys.append((task, m))
    rows = [{"task": t, "metric": m, "values": [r["results"].get(t, {}).get(m) for r in runs]} for t, m in keys]
    if any(r.get("h6") for r in runs):
        rows.append({"task": "H6", "metric": "mean of 6",
                     "values": [r["h6"]["score"] if r.get("h6") else None for r in runs]})
    ppl_files = []
    for r in runs:
        ppl_files += [p for p in r.get("perplexity", {}) if p not in ppl_files]
    for p in ppl_files:
        rows.append({"task": f"ppl: {Path(p).name}", "metric": "perplexity",
                     "values": [r.get("perplexity", {}).get(p, {}).get("perplexity") for r in runs]})
    pref_rows: dict[str, list] = {}
    for i, r in enumerate(runs):
        for path, p in r.get("preference", {}).items():
            for label, q in _preference_rows(Path(path).name, p):
                pref_rows.setdefault(label, [None] * len(runs))[i] = q
    for label, per_run in pref_rows.items():
        for m in PREFERENCE_METRICS:
            values = [q.get(m) if q else None for q in per_run]
            if any(v is not None for v in values):
                rows.append({"task": label, "metric": m, "values": values})
    return {"columns": labels, "files": list(files), "rows": rows}


def compare_table(cmp: dict) -> str:
    head = "| task | metric | " + " | ".join(cmp["columns"]) + " |"
    sep = "|---|---|" + "---:|" * len(cmp["columns"])
    body = [f"| {r['task']} | {r['metric']} | " + " | ".join(_fmt(v) for v in r["values"]) + " |" for r in cmp["rows"]]
    return "\n".join([head, sep, *body]) + "\n"


def write_results(out: dict, path: str | Path) -> tuple[Path, Path]:
    """Write results JSON and its markdown table (same name, .md) atomically; return both paths."""
    path = Path(path)
    md = path.with_suffix(".md")
    write_text_atomic(path, json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(md, markdown_table(out))
    return path, md


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("upstack", "lm_eval", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------- stage
def _validate(cfg: EvalConfig, names: list[str]) -> None:
    if not names and not cfg.perplexity and not cfg.preference:
        raise ConfigError("nothing to do: give --tasks (e.g. h6), --perplexity FILE and/or --preference FILE")
    for k in cfg.task_files:
        if k not in LOCAL_TASKS:
            raise ConfigError(f"--task-file {k}=...: {k} is not a local task (local tasks: {', '.join(LOCAL_TASKS)})")
    for k in cfg.fewshot_files:
        if k not in LOCAL_TASKS:
            raise ConfigError(f"--fewshot-file {k}=...: {k} is not a local task (local tasks: {', '.join(LOCAL_TASKS)})")
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise DataError(f"--data-dir {cfg.data_dir}: no such folder")
    if cfg.limit is not None and cfg.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {cfg.limit}")
    if isinstance(cfg.batch_size, str) and not re.fullmatch(r"auto(:\d+)?|\d+", cfg.batch_size):
        raise ConfigError(f"--batch-size must be a number or 'auto', got {cfg.batch_size!r}")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise ConfigError("--num-fewshot must be >= 0")
    for f in cfg.perplexity:
        if not Path(f).is_file():
            raise DataError(f"--perplexity {f}: file not found")
    for f in cfg.preference:
        if not Path(f).is_file():
            raise DataError(f"--preference {f}: file not found")
    if (cfg.preference_reference or cfg.preference_group) and not cfg.preference:
        raise ConfigError("--preference-reference and --preference-group need --preference FILE")
    if cfg.preference_reference:
        check_model_path(cfg.preference_reference, "--preference-reference")

    if cfg.template not in CHAT_TEMPLATES:
        raise ConfigError(f"--template {cfg.template!r}: not one of {', '.join(CHAT_TEMPLATES)}")
    if cfg.backend == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("--backend vllm needs vLLM: pip install 'upstack[vllm]' (or pip install vllm)")
    _check_names(names)


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


_NOTE_FILTER = _DropCustomDatasetNote()
_TRUNCATIONS = _CountTruncations()


def evaluate(cfg: EvalConfig) -> dict:
    """Score `cfg.model` on `cfg.tasks` (and perplexity files); write `cfg.output` if set; return the results.

    Results (stable keys, see docs/evaluation.md): format, model, date, config, tasks, results
    {task: {metric: value, metric_stderr: value}}, groups, n_samples, num_fewshot, data_files, h6,
    perplexity, preference, versions. Under `accelerate launch`, only the main process returns results ({} elsewhere).
    """
    names = expand_tasks(cfg)
    _validate(cfg, names)
    logging.getLogger("lm_eval.api.task").addFilter(_NOTE_FILTER)
    logging.getLogger("lm_eval.evaluator").addFilter(_NOTE_FILTER)
    logging.getLogger("lm_eval.models.huggingface").addFilter(_TRUNCATIONS)
    _TRUNCATIONS.count = 0
    check_model_path(cfg.model)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out: dict[str, Any] = {"format": RESULTS_FORMAT, "model": cfg.model, "date": started,
                           "config": dataclasses.asdict(cfg), "tasks": names, "results": {}, "groups": {},
                           "n_samples": {}, "num_fewshot": {}, "data_files": {}, "h6": None, "perplexity": {},
                           "preference": {}}
    lm = None
    if names:
        with tempfile.TemporaryDirectory(prefix="upstack-tasks-") as tmp:
            for n in names:
                if n in LOCAL_TASKS:
                    out["data_files"].update(_write_local_tasks(Path(tmp), n, cfg))
            tm = _task_manager(Path(tmp), names)
            top, leaves = _load_tasks(tm, names)
            for leaf, (top_name, task) in leaves.items():
                shots = _fewshot_for(top_name, leaf, cfg, task.get_config("num_fewshot"))
                task.set_config(key="num_fewshot", value=shots)
            lm = _load_lm(cfg)
            out.update(_run_harness(cfg, lm, tm, top, names))
        if out.get("_not_main"):
            return {}
        if _TRUNCATIONS.count > 1:
            log.warning("%d prompts were longer than the model's context and were truncated from the left "
                        "(fewer few-shot examples with --num-fewshot, or a longer --max-length if the model allows)",
                        _TRUNCATIONS.count)
    hf = getattr(lm, "model", None) if cfg.backend == "hf" and lm is not None else None
    model, tokenizer = (hf, getattr(lm, "tokenizer", None)) if hf is not None else (cfg.model, None)
    if cfg.perplexity or cfg.preference:

        if hf is None:
            model, tokenizer = load_for_inference(cfg.model, device=cfg.device, dtype=cfg.dtype)
    batch = cfg.batch_size if isinstance(cfg.batch_size, int) else 1
    limit = int(cfg.limit) if cfg.limit and cfg.limit >= 1 else None
    if cfg.perplexity:
        from upstack.evaluate.perplexity import perplexity

        for f in cfg.perplexity:
            out["perplexity"][f] = perplexity(model, f, tokenizer=tokenizer, text_field=cfg.text_field,
                                              max_length=cfg.max_length, stride=cfg.stride, batch_size=batch,
                                              limit=limit)
    if cfg.preference:
        from upstack.evaluate.preference import preference

        ref = ref_tok = None
        if cfg.preference_reference:
            ref, ref_tok = load_for_inference(cfg.preference_reference, device=cfg.device, dtype=cfg.dtype,
                                      what="reference model")
        for f in cfg.preference:
            out["preference"][f] = preference(model, f, tokenizer=tokenizer, reference=ref, reference_tokenizer=ref_tok,
                                              template=cfg.template, max_length=cfg.max_length,
                                              batch_size=max(batch, 2), limit=limit,
                                              group_field=cfg.preference_group)
            if ref is not None:
                out["preference"][f]["reference"] = cfg.preference_reference
    out["h6"] = h6_score(out["results"])
    out["versions"] = _versions()
    if cfg.output:
        write_results(out, cfg.output)
    return out


def _silence_lm_eval() -> None:
    """lm-eval passes `disable=` to tqdm explicitly (so TQDM_DISABLE is ignored) and shells out to git for
    a commit hash (printing git's complaint outside a repository): turn both off for --quiet."""
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
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    logging.getLogger("lm_eval").setLevel(logging.WARNING)


def _run_harness(cfg: EvalConfig, lm, tm, top: list, names: list[str]) -> dict:
    import lm_eval

    if cfg.quiet:
        _silence_lm_eval()

    gen_kwargs = None
    if any(t.get_config("output_type") == "generate_until" for t in _leaf_tasks(top)):
        budget = cfg.max_gen_toks
        if budget is None:
            ctx = (cfg.max_length or getattr(lm, "max_length", None) or max_positions(model_config(cfg.model) or {})
                   or DEFAULT_MAX_POSITIONS)
            budget = min(256, max(16, ctx // 4))
        gen_kwargs = {"max_gen_toks": budget}
    res = lm_eval.simple_evaluate(
        model=lm, tasks=top, num_fewshot=None, limit=cfg.limit, task_manager=tm, gen_kwargs=gen_kwargs,
        log_samples=False, apply_chat_template=cfg.apply_chat_template, random_seed=cfg.seed,
        numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    if res is None:  # not the main process under accelerate launch
        return {"_not_main": True}
    return _convert(res, names)


def _leaf_tasks(top: list) -> list:
    from lm_eval.api.group import Group

    out = []
    for obj in top:
        out += obj.get_all_tasks() if isinstance(obj, Group) else [obj]
    return out
