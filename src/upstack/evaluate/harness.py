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
import importlib.util
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from upstack.data.files import special_file_error
from upstack.errors import ConfigError, DataError
from upstack.evaluate.bridge import (
    NOTE_FILTER,
    TRUNCATIONS,
    fewshot_for,
    load_lm,
    load_tasks,
    run_harness,
    task_manager,
    write_samples,
)
from upstack.evaluate.config import EvalConfig, check_config
from upstack.evaluate.generate import check_prompt, generate_replies
from upstack.evaluate.model_args import check_model_arg_paths
from upstack.evaluate.perplexity import perplexity
from upstack.evaluate.preference import preference
from upstack.evaluate.results import (
    PREFERENCE_METRICS,
    RESULTS_FORMAT,
    compare,
    compare_table,
    h6_score,
    markdown_table,
    preference_parts,
    versions,
    write_results,
)
from upstack.evaluate.tasks.local import write_local_tasks
from upstack.evaluate.tasks.registry import H6, LOCAL_TASKS, expand_tasks
from upstack.lm import check_model_path, load_for_inference
from upstack.outputs import check_output_free

log = logging.getLogger(__name__)

# Re-exported: callers (commands, report, pipeline, tests) import these from here.
__all__ = ["EvalConfig", "check_config", "evaluate", "H6", "PREFERENCE_METRICS", "preference_parts", "compare",
           "compare_table", "markdown_table", "h6_score", "write_results"]


def _check_inputs(cfg: EvalConfig) -> None:
    """What check_config cannot see: that the named folders, files and models exist, and vLLM is installed."""
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise DataError(f"--data-dir {cfg.data_dir}: no such folder")
    for flag, files in (("--perplexity", cfg.perplexity), ("--preference", cfg.preference)):
        for f in files:
            if not Path(f).is_file():
                raise special_file_error(f, flag) or DataError(f"{flag} {f}: file not found")
    if cfg.preference_reference:
        check_model_path(cfg.preference_reference, "--preference-reference", allow_pickle=cfg.allow_pickle)
    check_model_arg_paths(cfg.model_args, cfg.backend, allow_pickle=cfg.allow_pickle)
    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("--backend vllm needs vLLM: pip install 'upstack[vllm]' (or pip install vllm)")


def evaluate(cfg: EvalConfig) -> dict:
    """Score `cfg.model` on `cfg.tasks` (and perplexity files); write `cfg.output` if set; return the results.

    Results (stable keys, see docs/evaluation.md): format, model, date, config, tasks, results
    {task: {metric: value, metric_stderr: value}}, groups, n_samples, num_fewshot, data_files, h6,
    perplexity, preference, replies (greedy replies to `samples`), versions, and with `log_samples` samples
    {task: samples file}. Under `accelerate launch`, only the main process returns results ({} elsewhere).
    """
    check_config(cfg)
    if cfg.output:
        check_output_free(cfg.output, cfg.overwrite)
    _check_inputs(cfg)
    names = expand_tasks(cfg)
    logging.getLogger("lm_eval.api.task").addFilter(NOTE_FILTER)
    logging.getLogger("lm_eval.evaluator").addFilter(NOTE_FILTER)
    logging.getLogger("lm_eval.models.huggingface").addFilter(TRUNCATIONS)
    TRUNCATIONS.count = 0
    check_model_path(cfg.model, allow_pickle=cfg.allow_pickle)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out: dict[str, Any] = {"format": RESULTS_FORMAT, "model": cfg.model, "date": started,
                           "config": dataclasses.asdict(cfg), "tasks": names, "results": {}, "groups": {},
                           "n_samples": {}, "num_fewshot": {}, "data_files": {}, "h6": None, "perplexity": {},
                           "preference": {}, "replies": []}
    lm = None
    if names:
        lm = _run_tasks(cfg, names, out)
        if out.get("_not_main"):
            return {}
    if int(os.environ.get("RANK", "0")) != 0:  # launched, files only: the main process scores and writes
        return {}
    _score_files(cfg, lm, out)
    out["h6"] = h6_score(out["results"])
    out["versions"] = versions()
    samples = out.pop("_samples", None)
    if cfg.output:
        if samples is not None:
            out["samples"] = write_samples(samples, cfg.output)
        write_results(out, cfg.output)
    return out


def _run_tasks(cfg: EvalConfig, names: list[str], out: dict):
    """Run the harness tasks into `out`; return lm-eval's model (its HF model scores the files too)."""
    with tempfile.TemporaryDirectory(prefix="upstack-tasks-") as tmp:
        for n in names:
            if n in LOCAL_TASKS:
                out["data_files"].update(write_local_tasks(Path(tmp), n, cfg))
        tm = task_manager(Path(tmp), names)
        top, leaves = load_tasks(tm, names)
        for leaf, (top_name, task) in leaves.items():
            shots = fewshot_for(top_name, leaf, cfg, task.get_config("num_fewshot"))
            task.set_config(key="num_fewshot", value=shots)
        lm = load_lm(cfg)
        out.update(run_harness(cfg, lm, tm, top, names))
        out["processes"] = getattr(lm, "world_size", 1)  # > 1: the documents were split across processes
    if not out.get("_not_main") and TRUNCATIONS.count > 1:
        log.warning("%d prompts were longer than the model's context and were truncated from the left "
                    "(fewer few-shot examples with --num-fewshot, or a longer --max-length if the model allows)",
                    TRUNCATIONS.count)
    return lm


def _score_files(cfg: EvalConfig, lm, out: dict) -> None:
    """Perplexity and preference files into `out`, with the harness's model when it has one loaded."""
    hf = getattr(lm, "model", None) if cfg.backend == "hf" and lm is not None else None
    model, tokenizer = (hf, getattr(lm, "tokenizer", None)) if hf is not None else (cfg.model, None)
    if (cfg.perplexity or cfg.preference or cfg.samples) and hf is None:
        model, tokenizer = load_for_inference(cfg.model, device=cfg.device, dtype=cfg.dtype,
                                              allow_pickle=cfg.allow_pickle)
    batch = cfg.batch_size if isinstance(cfg.batch_size, int) else 1
    limit = int(cfg.limit) if cfg.limit and cfg.limit >= 1 else None
    for f in cfg.perplexity:
        out["perplexity"][f] = perplexity(model, f, tokenizer=tokenizer, text_field=cfg.text_field,
                                          max_length=cfg.max_length, stride=cfg.stride, batch_size=batch,
                                          limit=limit, max_tokens=cfg.perplexity_max_tokens)
    if cfg.samples:  # greedy replies to the sample prompts, for the report's side-by-side view
        rows = [check_prompt(r, f"samples[{i}]") for i, r in enumerate(cfg.samples)]
        out["replies"] = generate_replies(model, tokenizer, rows, max_new_tokens=cfg.sample_max_new_tokens,
                                          where="samples")
    if not cfg.preference:
        return
    ref = ref_tok = None
    if cfg.preference_reference:
        ref, ref_tok = load_for_inference(cfg.preference_reference, device=cfg.device, dtype=cfg.dtype,
                                          what="reference model", allow_pickle=cfg.allow_pickle)
    for f in cfg.preference:
        out["preference"][f] = preference(model, f, tokenizer=tokenizer, reference=ref, reference_tokenizer=ref_tok,
                                          template=cfg.template, max_length=cfg.max_length,
                                          batch_size=max(batch, 2), limit=limit, group_field=cfg.preference_group)
        if ref is not None:
            out["preference"][f]["reference"] = cfg.preference_reference
