"""A run folder's results -> report.md (tables) + PNG training curves + results.json (every model's metrics)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from upstack.evaluate.harness import PREFERENCE_METRICS, preference_parts
from upstack.arch import format_layer_ranges, layer_runs

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


def _flat_scores(results: dict) -> dict[str, float]:
    """{task/metric: value} from an eval results file (skips stderr entries)."""
    out: dict[str, float] = {}
    for task, metrics in (results.get("results") or {}).items():
        if not isinstance(metrics, dict):
            continue
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k:
                out[f"{task}/{k}"] = float(v)
    h6 = results.get("h6")
    if isinstance(h6, (int, float)) and not isinstance(h6, bool):
        out["h6"] = float(h6)
    elif isinstance(h6, dict) and isinstance(h6.get("score"), (int, float)):
        out["h6"] = float(h6["score"])
    for path, v in (results.get("perplexity") or {}).items():
        if isinstance(v, dict) and isinstance(v.get("perplexity"), (int, float)):
            out[f"perplexity/{Path(path).name}"] = float(v["perplexity"])
    for path, v in (results.get("preference") or {}).items():
        if not isinstance(v, dict):
            continue
        for label, q in preference_parts(v):
            for k in PREFERENCE_METRICS:
                if isinstance(q.get(k), (int, float)):
                    out[f"preference/{Path(path).name}{label}/{k}"] = float(q[k])
    return out


def collect(run_dir: Path, stage_order: list[str] | None = None) -> dict:
    """Everything the report shows, as one JSON-able dict (also written as results.json)."""
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
    for name, m in stages.items():
        if m["type"] == "eval":
            res = _read_json(run_dir / name / "results.json") or {}
            model_stage = Path(str(m["config"].get("model", name))).name
            block = name[: -len(model_stage) - 1] if name.endswith(f"_{model_stage}") else "eval"
            prefix = "" if block == "eval" else f"{block}:"
            models.setdefault(model_stage, {}).update(
                {prefix + k: v for k, v in _flat_scores(res).items()})
        if m["type"] == "contamination":
            res = _read_json(run_dir / name / "contamination.json") or {}
            model_stage = Path(str(m["config"].get("model", name))).name
            for k, v in (res.get("benchmarks") or res.get("results") or {}).items():
                val = v.get("result") if isinstance(v, dict) else v
                if isinstance(val, (int, float)):
                    models.setdefault(model_stage, {})[f"contamination/{k}"] = float(val)
    order = list(stages)
    models = dict(sorted(models.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    curves = {name: _read_metrics(run_dir / name) for name, m in stages.items()}
    curves = {k: v for k, v in curves.items() if v}
    layer_maps = []
    for name, m in stages.items():
        if m["type"] == "upscale":
            prov = _read_json(run_dir / name / "upstack.json") or {}
            layer_maps.append({"stage": name, **(prov.get("upscale") or {})})
    return {"run_dir": str(run_dir), "stages": {k: {"type": v["type"], "seconds": v.get("seconds"),
                                                    "finished": v.get("finished"), "result": v.get("result")}
                                                for k, v in stages.items()},
            "models": models, "layer_maps": layer_maps,
            "final_metrics": {k: _final(v) for k, v in curves.items()}}


def _final(rows: list[dict]) -> dict:
    out: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[k] = v
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _score_table(models: dict[str, dict], names: list[str]) -> list[str]:
    """Markdown rows: a row per metric (those any of `names` has, sorted), a column per model."""
    metrics = sorted({k for m in names for k in models.get(m, {})})
    out = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in metrics:
        out.append(f"| {k} | " + " | ".join(_fmt(models.get(m, {}).get(k)) for m in names) + " |")
    return out


PLOT_INDEX = ".plots.json"  # {png name: hash of the data plotted}: unchanged curves are not drawn again


def _plot(run_dir: Path, curves: dict[str, list[dict]]) -> list[str]:
    """PNG curves of the keys `upstack pretrain/sft/dpo` log in metrics.jsonl (train rows; eval rows for
    eval_loss). The report is rewritten after every stage; a plot whose data is unchanged is kept."""
    panels = [("loss", "training loss"), ("eval_loss", "held-out loss"),
              ("rewards/margin", "DPO reward margin (training batches)"),
              ("rewards/accuracy", "DPO reward accuracy (training batches)")]
    index = _read_json(run_dir / PLOT_INDEX) or {}
    written, todo = [], []
    for key, title in panels:
        series = {s: [(r.get("step"), r[key]) for r in rows if key in r and r.get("step") is not None]
                  for s, rows in curves.items()}
        series = {s: v for s, v in series.items() if v}
        if not series:
            continue
        fname = f"plot_{key.replace('/', '_')}.png"
        digest = hashlib.sha256(json.dumps([key, title, series], default=str).encode()).hexdigest()
        written.append(fname)
        if index.get(fname) != digest or not (run_dir / fname).is_file():
            todo.append((key, title, series, fname, digest))
    if todo:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for key, title, series, fname, digest in todo:
            fig, ax = plt.subplots(figsize=(6.5, 3.8))
            for s, pts in series.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=s, marker="." if len(pts) < 30 else None)
            ax.set_xlabel("step")
            ax.set_ylabel(key)
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(run_dir / fname, dpi=110)
            plt.close(fig)
            index[fname] = digest
        (run_dir / PLOT_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return written


def _header(run_dir: Path, recipe) -> list[str]:
    lines = [f"# upstack run: {run_dir.name}", ""]
    if recipe is not None:
        lines += [f"Recipe: `{recipe.path}`", ""]
        desc = recipe.raw.get("description")
        if desc:
            lines += [str(desc).strip(), ""]
    return lines


def _score_sections(models: dict[str, dict], recipe) -> list[str]:
    """Scores by model (stage order): a row per metric, a column per model; then the recipe's comparisons."""
    lines = []
    if models:
        lines += ["## Scores by stage", "", *_score_table(models, list(models)), ""]
    for comp in ((recipe.raw.get("report") or {}).get("comparisons", []) if recipe is not None else []):
        title, cmodels = comp.get("title", "comparison"), [m for m in comp.get("models", []) if m in models]
        if not any(models[m] for m in cmodels):
            continue
        lines += [f"## {title}", ""]
        if comp.get("note"):
            lines += [str(comp["note"]).strip(), ""]
        lines += [*_score_table(models, cmodels), ""]
    return lines


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
    return lines


def _timings_section(stages: dict[str, dict]) -> list[str]:
    lines = ["## Timings", "", "| stage | type | seconds | finished |", "|---|---|---|---|"]
    total = 0.0
    for s, v in stages.items():
        total += v.get("seconds") or 0
        lines.append(f"| {s} | {v['type']} | {_fmt(v.get('seconds'))} | {v.get('finished') or '-'} |")
    return lines + [f"| total | | {total:.1f} | |", ""]


def write_report(run_dir: str | Path, recipe=None) -> Path:
    run_dir = Path(run_dir)
    order = list(recipe.stages) if recipe is not None else None
    data = collect(run_dir, order)
    curves = {name: _read_metrics(run_dir / name) for name in data["stages"]}
    curves = {k: v for k, v in curves.items() if v}
    plots = _plot(run_dir, curves) if curves else []
    lines = [*_header(run_dir, recipe), *_score_sections(data["models"], recipe),
             *_decontamination_section(data["stages"]), *_training_section(data["final_metrics"])]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    lines += [*_layer_map_sections(data["layer_maps"]), *_timings_section(data["stages"])]
    (run_dir / "results.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    out = run_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
