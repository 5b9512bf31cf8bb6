"""`EvalConfig`, what `upstack eval` runs, and `check_config`, its checks that need no file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from upstack.data.chat import TEMPLATES as CHAT_TEMPLATES
from upstack.errors import ConfigError, DataError
from upstack.evaluate.generate import check_prompt
from upstack.evaluate.model_args import check_model_args
from upstack.evaluate.tasks.registry import LOCAL_TASKS, check_local_names, expand_tasks


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
    perplexity_max_tokens: int | None = None  # score only the first N tokens of each perplexity file
    preference: list[str] = field(default_factory=list)  # (prompt, chosen, rejected) files: preference accuracy
    preference_reference: str | None = None  # model whose log-probs give the DPO implicit reward (e.g. the SFT model)
    preference_group: str | None = None  # row field to break preference metrics down by (e.g. kind)
    template: str = "auto"  # chat template for --preference: auto | chat | alpaca (as for sft/dpo)
    samples: list[str | dict[str, Any]] = field(default_factory=list)  # prompts: greedy replies go into the results
    sample_max_new_tokens: int = 64  # the longest reply to a sample prompt, in tokens
    output: str | None = None  # results JSON (a markdown table is written next to it, .md)
    overwrite: bool = False  # replace an existing `output` (refused otherwise, before any work)
    log_samples: bool = False  # per-document records beside `output`: samples_<task>_<time>.jsonl, as lm-eval writes
    quiet: bool = False  # no progress bars or info logs from lm-eval
    allow_pickle: bool = False  # models stored as pickled .bin (loaded with torch.load(weights_only=True))


def check_config(cfg: EvalConfig) -> None:
    """The values of an eval run: something to do, known task names, option combinations, the template.

    No file is read (a recipe's inputs may come from stages that have not run yet); `evaluate` checks
    that the folders, files and models exist.
    """
    names = expand_tasks(cfg)
    if not names and not cfg.perplexity and not cfg.preference and not cfg.samples:
        raise ConfigError("nothing to do: give --tasks (e.g. h6), --perplexity FILE, --preference FILE and/or "
                          "--sample PROMPT")
    for i, row in enumerate(cfg.samples):
        try:
            check_prompt(row, f"samples[{i}]")
        except DataError as e:
            raise ConfigError(str(e)) from None
    if cfg.sample_max_new_tokens < 1:
        raise ConfigError(f"sample_max_new_tokens must be at least 1, got {cfg.sample_max_new_tokens}")
    for flag, files in (("--task-file", cfg.task_files), ("--fewshot-file", cfg.fewshot_files)):
        for k in files:
            if k not in LOCAL_TASKS:
                raise ConfigError(f"{flag} {k}=...: {k} is not a local task (local tasks: {', '.join(LOCAL_TASKS)})")
    if cfg.limit is not None and cfg.limit <= 0:
        raise ConfigError(f"--limit must be positive, got {cfg.limit}")
    if isinstance(cfg.batch_size, str) and not re.fullmatch(r"auto(:\d+)?|\d+", cfg.batch_size):
        raise ConfigError(f"--batch-size must be a number or 'auto', got {cfg.batch_size!r}")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise ConfigError("--num-fewshot must be >= 0")
    if cfg.log_samples and not cfg.output:
        raise ConfigError("--log-samples needs --output FILE (the samples files are written beside it)")
    if (cfg.preference_reference or cfg.preference_group) and not cfg.preference:
        raise ConfigError("--preference-reference and --preference-group need --preference FILE")
    if cfg.template not in CHAT_TEMPLATES:
        raise ConfigError(f"--template {cfg.template!r}: not one of {', '.join(CHAT_TEMPLATES)}")
    check_local_names(names)
    check_model_args(cfg.model_args, cfg.backend)
