"""The tasks `upstack eval` knows by name: the H6 leaderboard six (real and local), the local tasks'
files and formats, and the presets; task-name expansion and checks (pure, no files read)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from upstack.errors import ConfigError

TASK_YAML_DIR = Path(__file__).parent  # the local tasks' YAML templates


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


def split_names(names: list[str]) -> list[str]:
    out = []
    for item in names:
        out += [n.strip() for n in str(item).split(",") if n.strip()]
    return out


def expand_tasks(cfg) -> list[str]:
    """Task names after expanding comma lists and presets; 'h6' means the local six when data are local."""
    local_data = bool(cfg.data_dir or cfg.task_files)
    out: list[str] = []
    for name in split_names(cfg.tasks):
        if name == "h6" and local_data:
            name = "h6_local"
        for n in PRESETS.get(name, [name]):
            if n not in out:
                out.append(n)
    return out


def fewshot_for(top_name: str, leaf_name: str, cfg, default: int | None) -> int:
    """The few-shot count of a task: --num-fewshot TASK=N (the leaf, e.g. one MMLU subject, or its group),
    else --num-fewshot N, else the leaderboard's count for H6 tasks, else the task's own default."""
    for key in (leaf_name, top_name):
        if key in cfg.task_fewshot:
            return cfg.task_fewshot[key]
    if cfg.num_fewshot is not None:
        return cfg.num_fewshot
    if top_name in H6_BY_TASK:
        return H6_BY_TASK[top_name].num_fewshot
    return default if default is not None else 0


def known_task_names() -> list[str]:
    return list(PRESETS) + [t.task for t in H6] + list(LOCAL_TASKS)


def check_local_names(names: list[str]) -> None:
    """Reject names that are obviously not tasks before indexing lm-eval (e.g. a local name misspelt)."""
    for n in names:
        if n in LOCAL_TASKS:
            continue
        if n.endswith("_local"):
            close = difflib.get_close_matches(n, list(LOCAL_TASKS), n=1)
            raise ConfigError(f"unknown task {n}; local tasks are {', '.join(LOCAL_TASKS)}"
                              + (f" (did you mean {close[0]}?)" if close else ""))
        # `gsm8k_lokal`: a local task misspelt (lm-eval's own names are never this close to ours)
        close = difflib.get_close_matches(n, list(LOCAL_TASKS), n=1, cutoff=0.85)
        if close:
            raise ConfigError(f"unknown task {n} (did you mean {close[0]}?)")
