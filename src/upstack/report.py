"""A run folder's results -> report.md (tables) + PNG training curves + results.json (every model's metrics)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from upstack.arch import format_layer_ranges, layer_runs
from upstack.evaluate.contamination import VERDICT_TEXT, verdict
from upstack.evaluate.generate import replies_table
from upstack.evaluate.harness import PREFERENCE_METRICS, preference_parts
from upstack.evaluate.results import primary_metrics
from upstack.evaluate.tasks.registry import H6_BY_TASK
from upstack.outputs import write_file
from upstack.report_plots import PLOT_NOTES, plot_curves

# The file in each stage folder that records a completed stage (written by the pipeline, read here). It
# lives here, the lower of the two modules, so that the pipeline imports it without a cycle.
MARKER = "upstack_stage.json"


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _read_metrics(folder: Path) -> list[dict]:
    rows = []
    f = folder / "metrics.jsonl"
    if f.is_file():
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _stderr_key(metric: str) -> str:
    """lm-eval's standard-error key of a metric: acc -> acc_stderr, exact_match,strict-match ->
    exact_match_stderr,strict-match."""
    name, sep, filt = metric.partition(",")
    return f"{name}_stderr{sep}{filt}"


def _binomial_se(p: float, n) -> float | None:
    return math.sqrt(p * (1 - p) / n) if isinstance(n, int) and n > 0 and 0 <= p <= 1 else None


def _flat_scores(results: dict) -> tuple[dict[str, float], dict[str, dict]]:
    """({task/metric: value}, {task/metric: {"stderr", "n"}}) from an eval results file.

    Benchmarks carry lm-eval's standard error and the number of documents scored; preference accuracies
    the binomial standard error over the pairs scored; perplexities the number of documents.
    """
    out: dict[str, float] = {}
    detail: dict[str, dict] = {}
    n_samples = results.get("n_samples") or {}
    for task, metrics in (results.get("results") or {}).items():
        if not isinstance(metrics, dict):
            continue
        n = (n_samples.get(task) or {}).get("effective")
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k:
                out[f"{task}/{k}"] = float(v)
                se = metrics.get(_stderr_key(k))
                detail[f"{task}/{k}"] = {"stderr": float(se) if isinstance(se, (int, float)) else None, "n": n}
    h6 = results.get("h6")
    if isinstance(h6, (int, float)) and not isinstance(h6, bool):
        out["h6"] = float(h6)
    elif isinstance(h6, dict) and isinstance(h6.get("score"), (int, float)):
        out["h6"] = float(h6["score"])
    for path, v in (results.get("perplexity") or {}).items():
        if isinstance(v, dict) and isinstance(v.get("perplexity"), (int, float)):
            out[f"perplexity/{Path(path).name}"] = float(v["perplexity"])
            se = v.get("perplexity_stderr")  # over the scored windows (n), when the file has more than one
            detail[f"perplexity/{Path(path).name}"] = {"stderr": se if isinstance(se, (int, float)) else None,
                                                       "n": v.get("windows", v.get("documents"))}
    for path, v in (results.get("preference") or {}).items():
        if not isinstance(v, dict):
            continue
        for label, q in preference_parts(v):
            for k in (*PREFERENCE_METRICS, "chosen_nll_per_token"):  # + the chosen replies' loss (lower is better)
                if isinstance(q.get(k), (int, float)):
                    key = f"preference/{Path(path).name}{label}/{k}"
                    out[key] = float(q[k])
                    n = q.get("scored")
                    detail[key] = {"stderr": _binomial_se(float(q[k]), n) if "accuracy" in k else None, "n": n}
    return out, detail


MODEL_TYPES = {"base", "import", "upscale", "pretrain", "sft", "dpo", "merge", "merge-adapter"}  # stages that write a model


def _parents(marker: dict, stages: dict[str, dict]) -> list[str]:
    """The model stages a model stage started from (training: model; upscale: source; merge: models)."""
    cfg = marker.get("config") or {}
    refs = [cfg.get("model"), cfg.get("source"), cfg.get("base")]
    refs += [m.get("model") if isinstance(m, dict) else m for m in cfg.get("models") or []]
    names = [Path(str(r)).name for r in refs if isinstance(r, str) and r]
    return [n for i, n in enumerate(names) if n in stages and n not in names[:i]]


def collect(run_dir: Path, stage_order: list[str] | None = None) -> dict:
    """Everything the report shows, as one JSON-able dict (also written as results.json).

    models {model: {metric key: value}} keeps the full metric keys; details {model: {key: {stderr, n}}},
    labels {key: the short label the tables show}, contamination {model: {benchmark: what the test used
    and found}}, replies {model: [its greedy replies to the eval's samples]}, parents {model: [the models
    it started from]}.
    """
    run_dir = Path(run_dir)
    stages = {}
    names = stage_order or sorted((p.name for p in run_dir.iterdir() if (p / MARKER).is_file()),
                                  key=lambda n: (_read_json(run_dir / n / MARKER) or {}).get("finished") or "")
    for name in names:
        marker = _read_json(run_dir / name / MARKER)
        if marker is None:
            continue
        stages[name] = marker
    models: dict[str, dict] = {}
    details: dict[str, dict] = {}
    groups: dict[str, str] = {}
    contamination: dict[str, dict] = {}
    replies: dict[str, list[dict]] = {}
    for name, m in stages.items():
        if m["type"] == "eval":
            res = _read_json(run_dir / name / "results.json") or {}
            model_stage = Path(str(m["config"].get("model", name))).name
            block = name[: -len(model_stage) - 1] if name.endswith(f"_{model_stage}") else "eval"
            prefix = "" if block == "eval" else f"{block}:"
            values, detail = _flat_scores(res)
            models.setdefault(model_stage, {}).update({prefix + k: v for k, v in values.items()})
            details.setdefault(model_stage, {}).update({prefix + k: v for k, v in detail.items()})
            if m["config"].get("preference_group"):
                groups[prefix] = str(m["config"]["preference_group"])
            if res.get("replies"):
                replies.setdefault(model_stage, []).extend(res["replies"])
        if m["type"] == "contamination":
            res = _read_json(run_dir / name / "contamination.json") or {}
            model_stage = Path(str(m["config"].get("model", name))).name
            for k, v in (res.get("benchmarks") or res.get("results") or {}).items():
                val = v.get("result") if isinstance(v, dict) else v
                if isinstance(val, (int, float)):
                    models.setdefault(model_stage, {})[f"contamination/{k}"] = float(val)
                    contamination.setdefault(model_stage, {})[k] = {
                        "result": float(val), "method": res.get("method"), "examples": v.get("examples"),
                        "available": v.get("available"), "neighbours": v.get("neighbours"),
                        "verdict": v.get("verdict"), "threshold": (res.get("config") or {}).get("threshold"),
                        "reference": Path(str(res["reference"])).name if res.get("reference") else None,
                        "stage": name} if isinstance(v, dict) else {"result": float(val), "stage": name}
    order = list(stages)
    models = dict(sorted(models.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    curves = {name: _read_metrics(run_dir / name) for name, m in stages.items()}
    curves = {k: v for k, v in curves.items() if v}
    layer_maps = []
    for name, m in stages.items():
        if m["type"] == "upscale":
            prov = _read_json(run_dir / name / "upstack.json") or {}
            layer_maps.append({"stage": name, **(prov.get("upscale") or {})})
    keys = [k for v in models.values() for k in v]
    return {"run_dir": str(run_dir), "stages": {k: {"type": v["type"], "seconds": v.get("seconds"),
                                                    "finished": v.get("finished"), "result": v.get("result")}
                                                for k, v in stages.items()},
            "models": models, "details": details, "labels": metric_labels(keys, groups),
            "contamination": contamination, "replies": replies,
            "parents": {k: _parents(v, stages) for k, v in stages.items() if v["type"] in MODEL_TYPES},
            "layer_maps": layer_maps, "final_metrics": {k: _final(v) for k, v in curves.items()}}


def _final(rows: list[dict]) -> dict:
    out: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[k] = v
    return out


# ------------------------------------------------------------------------------------------------
# Labels and numbers

TASK_NAMES = {"gsm8k": "GSM8K", "arc_challenge": "ARC-Challenge", "hellaswag": "HellaSwag", "mmlu": "MMLU",
              "truthfulqa_mc2": "TruthfulQA MC2", "winogrande": "Winogrande"}
METRIC_NAMES = {"acc": "acc.", "acc_norm": "acc. (length-normalised)", "exact_match": "exact match",
                "exact_match,strict-match": "exact match (strict)",
                "exact_match,flexible-extract": "exact match (flexible)", "accuracy": "preference acc.",
                "accuracy_per_token": "preference acc. per token", "margin": "preference log-prob margin",
                "reward_accuracy": "DPO reward acc.", "reward_margin": "DPO reward margin",
                "chosen_nll_per_token": "chosen-reply NLL per token"}
_PREF = re.compile(r"preference/(?P<file>.+?)(\[(?P<group>[^\]]*)\])?/(?P<metric>[^/]+)$")


def _split_key(key: str) -> tuple[str, str]:
    """'pref:preference/x.jsonl/accuracy' -> ('pref', 'preference/x.jsonl/accuracy'); no block -> ('', key)."""
    head = key.split("/", 1)[0]
    if ":" in head:
        block, _, rest = key.partition(":")
        return block, rest
    return "", key


def _label(key: str, groups: dict[str, str], several_pref_files: bool) -> str:
    block, rest = _split_key(key)
    if rest == "h6":
        return "H6 (mean of 6)"
    kind, _, tail = rest.partition("/")
    if kind in ("perplexity", "contamination"):
        return f"{kind}, {tail}"
    m = _PREF.match(rest)
    if m:
        label = METRIC_NAMES.get(m["metric"], m["metric"])
        field = groups.get(f"{block}:" if block else "")
        label += f", {field + ' ' if field else ''}{m['group']}" if m["group"] else ", all pairs"
        return label + (f" ({m['file']})" if several_pref_files else "")
    task, _, metric = rest.rpartition("/")
    name = TASK_NAMES.get(task.removesuffix("_local"), task)
    return f"{name} {METRIC_NAMES.get(metric, metric)}"


def metric_labels(keys: list[str], groups: dict[str, str] | None = None) -> dict[str, str]:
    """{full metric key: short label} ("pref:preference/dpo_heldout.jsonl[operation]/accuracy" -> "preference
    acc., kind operation"); a label two keys would share falls back to the full keys."""
    keys = list(dict.fromkeys(keys))
    pref_files = {m["file"] for k in keys if (m := _PREF.match(_split_key(k)[1]))}
    labels = {k: _label(k, groups or {}, len(pref_files) > 1) for k in keys}
    seen: dict[str, int] = {}
    for v in labels.values():
        seen[v] = seen.get(v, 0) + 1
    return {k: v if seen[v] == 1 else k for k, v in labels.items()}


def _num(v) -> str:
    """3 significant digits (thousands separated from 1000 on); integers as they are."""
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


_fmt = _num


def _cell(value, detail: dict | None) -> str:
    """'0.35 ± 0.05 (n=100)': the value, its standard error when known, the number of documents."""
    if value is None:
        return "-"
    detail = detail or {}
    se, n = detail.get("stderr"), detail.get("n")
    return _num(value) + (f" ± {se:.2g}" if se is not None else "") + (f" (n={n})" if n else "")


def _compared_keys(models: dict[str, dict], names: list[str], least: int = 2) -> list[str]:
    """The metrics at least `least` of `names` have (a row of one value compares nothing), in a stable order;
    contamination results have their own section."""
    counts: dict[str, int] = {}
    for m in names:
        for k in models.get(m, {}):
            counts[k] = counts.get(k, 0) + 1
    return sorted(k for k, c in counts.items() if c >= least and not k.startswith("contamination/"))


def _score_table(data: dict, names: list[str], keys: list[str]) -> list[str]:
    """Markdown rows: a row per metric of `keys`, a column per model of `names`."""
    models, details, labels = data["models"], data.get("details", {}), data.get("labels", {})
    out = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in keys:
        out.append(f"| {labels.get(k, k)} | "
                   + " | ".join(_cell(models.get(m, {}).get(k), details.get(m, {}).get(k)) for m in names) + " |")
    return out


# ------------------------------------------------------------------------------------------------
# The reading: what each stage did to the model, against the noise

NOISE_SE = 2.0  # a difference counts when it exceeds this many combined standard errors


def _reading_keys(models: dict[str, dict]) -> list[str]:
    """The headline metrics: each benchmark's leaderboard metric, perplexities, preference accuracies."""
    keys = sorted({k for v in models.values() for k in v})
    out = []
    for k in keys:
        _, rest = _split_key(k)
        if rest.startswith("perplexity/") or (_PREF.match(rest) and rest.endswith("/accuracy")):
            out.append(k)
        elif "/" in rest and not rest.startswith(("contamination/", "preference/")):
            task, _, metric = rest.rpartition("/")
            if metric in primary_metrics(task, {metric: 0.0}) and (task not in H6_BY_TASK
                                                                   or metric == H6_BY_TASK[task].metric):
                out.append(k)
    return out


def compare_scores(data: dict, model: str, parent: str, keys: list[str]) -> dict[str, list[str]]:
    """{"improved": [...], "worsened": [...], "noise": [...]}: a phrase for each metric both models have
    (higher is better, but for perplexity)."""
    models, details, labels = data["models"], data.get("details", {}), data.get("labels", {})
    out: dict[str, list[str]] = {"improved": [], "worsened": [], "noise": []}
    for k in keys:
        a, b = models.get(parent, {}).get(k), models.get(model, {}).get(k)
        if a is None or b is None:
            continue
        d = b - a
        sa, sb = (details.get(x, {}).get(k, {}).get("stderr") for x in (parent, model))
        label = labels.get(k, k)
        if d == 0:
            out["noise"].append(f"{label} (unchanged, {_num(a)})")
            continue
        lower = _split_key(k)[1].startswith("perplexity/") or k.endswith("nll_per_token")
        better = (d < 0) if lower else (d > 0)
        if sa is not None and sb is not None:
            limit = NOISE_SE * math.sqrt(sa * sa + sb * sb)
            if abs(d) <= limit:
                out["noise"].append(f"{label} ({d:+.2g})")
                continue
            change = f"{_num(a)} → {_num(b)} ({d:+.2g}, 2 s.e. {limit:.2g})"
        else:
            change = f"{_num(a)} → {_num(b)}" + (f" ({d / a:+.0%}, no s.e.)" if a else "")
        out["improved" if better else "worsened"].append(f"{label} {change}")
    return out


def _reading_section(data: dict) -> list[str]:
    models = data["models"]
    keys = _reading_keys(models)
    sentences = []
    for model, parents in data.get("parents", {}).items():
        parent = next((p for p in parents if p in models), None)
        if model not in models or parent is None:
            continue
        c = compare_scores(data, model, parent, keys)
        if not any(c.values()):
            continue
        start = f"`{model}` (from `{parent}`" + (f"; a merge of {', '.join(parents)}" if len(parents) > 1 else "") + ")"
        parts = [f"{what}: {'; '.join(c[key])}" for key, what in (("improved", "improved"), ("worsened", "worsened"),
                                                                   ("noise", "within noise")) if c[key]]
        sentences.append(f"{start} {'. '.join(parts)}.")
    if not sentences:
        return []
    return ["## Reading", "",
            "What each stage did to its model on the held-out evaluations, against the model it started from. "
            "Improved means a higher score or a lower perplexity. A score difference counts only when it exceeds "
            f"{NOISE_SE:g} combined standard errors, {NOISE_SE:g}·√(se₁² + se₂²), of the two scores; below that it is "
            "within noise (the change is given in brackets). A perplexity's standard error is taken over its scored "
            "windows; a perplexity of a single window has none, and its change is given as measured. " + " ".join(sentences), ""]


# ------------------------------------------------------------------------------------------------
# Sections

def _header(run_dir: Path, recipe) -> list[str]:
    lines = [f"# upstack run: {run_dir.name}", ""]
    if recipe is not None:
        lines += [f"Recipe: `{recipe.path}`", ""]
        desc = recipe.raw.get("description")
        if desc:
            lines += [str(desc).strip(), ""]
    return lines


def _score_sections(data: dict, recipe) -> list[str]:
    """Scores by model (stage order): a row per metric two models have, a column per model; then the
    recipe's comparisons."""
    models, labels = data["models"], data.get("labels", {})
    names = list(models)
    keys = _compared_keys(models, names, least=1 if len(names) == 1 else 2)
    lines = []
    if keys:
        lines += ["## Scores by stage", "",
                  "Each cell: the score ± its standard error (lm-eval's for benchmarks, binomial for preference "
                  "accuracies, over the scored windows for perplexities) and the number of documents, pairs or "
                  "windows scored. Full metric keys are in results.json "
                  "(`labels` maps them to these names).", "", *_score_table(data, names, keys), ""]
        singles = [k for k in _compared_keys(models, names, least=1) if k not in keys]
        if singles:
            lines += ["Measured for one model only: " + "; ".join(
                f"{labels.get(k, k)}: `{m}` {_cell(models[m][k], data['details'].get(m, {}).get(k))}"
                for k in singles for m in names if k in models[m]) + ".", ""]
    for comp in ((recipe.raw.get("report") or {}).get("comparisons", []) if recipe is not None else []):
        title, cmodels = comp.get("title", "comparison"), [m for m in comp.get("models", []) if m in models]
        ckeys = _compared_keys(models, cmodels)
        if not ckeys:
            continue
        lines += [f"## {title}", ""]
        if comp.get("note"):
            lines += [str(comp["note"]).strip(), ""]
        lines += [*_score_table(data, cmodels, ckeys), ""]
    return lines


def _contamination_section(contamination: dict[str, dict]) -> list[str]:
    if not contamination:
        return []
    lines = ["## Contamination test", "",
             "The test SOLAR 10.7B reports (the detect-pretrain-code-contamination procedure): for each sampled benchmark example the reference "
             "model writes neighbours by continuing the example's first 40% of words; the example's score is the "
             "share of neighbours the model finds easier than the example. The result is the share of examples "
             "scoring below the threshold (0.1): > 0.9 likely contaminated, < 0.1 clean, in between inconclusive. With "
             "N examples it moves in steps of 1/N.", "",
             "| model | benchmark | result | reading | examples | neighbours each | reference |",
             "|---|---|---:|---|---:|---:|---|"]
    for model, benches in contamination.items():
        for bench, c in benches.items():
            if c.get("method") == "min-k":
                reading = "Min-K% Prob: share of examples more likely under the model than the reference"
            else:
                reading = VERDICT_TEXT[c.get("verdict") or verdict(c["result"])]
            examples = c.get("examples")
            if examples and c.get("available"):
                examples = f"{examples} of {c['available']}"
            lines.append(f"| {model} | {bench} | {_num(c['result'])} | {reading} | {_num(examples)} "
                         f"| {_num(c.get('neighbours'))} | {c.get('reference') or '-'} |")
    return lines + [""]


def _decontamination_section(stages: dict[str, dict]) -> list[str]:
    decon = {k: v for k, v in stages.items() if v["type"] == "decontaminate" and isinstance(v.get("result"), dict)}
    if not decon:
        return []
    lines = ["## Decontamination", "",
             "Training rows sharing an n-gram (lowercased words) with a benchmark example are removed before "
             "training; the later stages read the kept rows.", "",
             "| stage | training file | n-gram | rows | removed | benchmarks: rows removed / examples (too short to match) |",
             "|---|---|---:|---:|---:|---|"]
    for name, v in decon.items():
        r = v["result"]
        marks = ", ".join(f"{b}: {st.get('rows_removed', '?')} / {st.get('examples', '?')}"
                          + (f" ({st['short_examples']})" if st.get("short_examples") else "")
                          for b, st in (r.get("benchmarks") or {}).items())
        lines.append(f"| {name} | {Path(str(r.get('data', ''))).name} | {r.get('ngram')} | {r.get('rows')} "
                     f"| {r.get('removed')} | {marks} |")
    return lines + [""]


def _training_section(final_metrics: dict[str, dict]) -> list[str]:
    if not final_metrics:
        return []
    keys = ["loss", "eval_loss", "eval_perplexity", "rewards/margin", "rewards/accuracy", "eval_rewards/margin",
            "eval_rewards/accuracy", "tokens_per_s", "trainable", "peak_rss_mb", "step"]
    present = [k for k in keys if any(k in v for v in final_metrics.values())]
    lines = ["## Training (last logged values)", "", "| stage | " + " | ".join(present) + " |",
             "|---|" + "---|" * len(present)]
    for s, v in final_metrics.items():
        lines.append(f"| {s} | " + " | ".join(_fmt(v.get(k)) for k in present) + " |")
    return lines + [""]


def _layer_map_sections(layer_maps: list[dict]) -> list[str]:
    lines = []
    for lm in layer_maps:
        if not lm.get("layer_map"):
            continue
        lmap = lm["layer_map"]
        lines += [f"## Layer map of the up-scaled model `{lm['stage']}`", "",
                  f"Stage `{lm['stage']}` ({lm.get('method')}): {lm.get('source_num_hidden_layers')} -> {len(lmap)} layers.",
                  "", "| output layers | source layers |", "|---|---|"]
        lines += [f"| {a}-{b} | {sa}-{sb} |" for a, b, sa, sb in layer_runs(lmap)]
        if lm.get("new_layers"):
            lines.append(f"\nZero-initialised blocks: {format_layer_ranges(lm['new_layers'])}")
        lines.append("")
        if isinstance(lm.get("seam"), dict):
            lines += _seam_table(lm["seam"])
    return lines


def _seam_table(seam: dict) -> list[str]:
    """The placements `upscale --seam auto` scored (upstack.json's upscale.seam), the chosen one and SOLAR's."""
    k, score = seam.get("block_length"), seam.get("score")
    lines = [f"The duplicated block was chosen by its {'angular distance at the seam' if score == 'angle' else score} "
             f"(`--seam auto`): layers {seam['block'][0]}-{seam['block'][1]}.", "",
             "| duplicated block | angular distance | step-0 perplexity | |", "|---|---|---|---|"]
    for row in seam.get("table") or []:
        j = row["start"]
        mark = ", ".join(x for x in ("chosen" if j == seam.get("start") else "",
                                     "SOLAR" if j == seam.get("solar_start") else "") if x)
        lines.append(f"| {j}-{j + k - 1} | {_fmt(row.get('angular_distance'))} | {_fmt(row.get('perplexity'))} | {mark} |")
    return lines + [""]


def _timings_section(stages: dict[str, dict]) -> list[str]:
    lines = ["## Timings", "", "| stage | type | seconds | finished |", "|---|---|---|---|"]
    total = 0.0
    for s, v in stages.items():
        total += v.get("seconds") or 0
        lines.append(f"| {s} | {v['type']} | {_fmt(v.get('seconds'))} | {v.get('finished') or '-'} |")
    return lines + [f"| total | | {total:.1f} | |", ""]


# ------------------------------------------------------------------------------------------------
# Plots

def write_report(run_dir: str | Path, recipe=None) -> Path:
    run_dir = Path(run_dir)
    order = list(recipe.stages) if recipe is not None else None
    data = collect(run_dir, order)
    curves = {name: _read_metrics(run_dir / name) for name in data["stages"]}
    curves = {k: v for k, v in curves.items() if v}
    types = {k: v["type"] for k, v in data["stages"].items()}
    plots = plot_curves(run_dir, curves, types) if curves else []
    lines = [*_header(run_dir, recipe), *_reading_section(data), *_score_sections(data, recipe),
             *replies_table(data["replies"]),
             *_contamination_section(data["contamination"]), *_decontamination_section(data["stages"]),
             *_training_section(data["final_metrics"])]
    for p in plots:
        lines += [f"![{p}]({p})", ""] + ([PLOT_NOTES[p], ""] if p in PLOT_NOTES else [])
    lines += [*_layer_map_sections(data["layer_maps"]), *_timings_section(data["stages"])]
    # written as new files renamed into place: a link planted at one of these names is refused, never followed
    write_file(run_dir / "results.json", json.dumps(data, indent=2, default=str) + "\n")
    return write_file(run_dir / "report.md", "\n".join(lines) + "\n")
