"""The results of `upstack eval`: lm-eval's output converted to our stable keys, the H6 score, the
markdown table, the side-by-side comparison of several results files, and writing them."""

from __future__ import annotations

import json
from pathlib import Path

from upstack.errors import DataError
from upstack.evaluate.tasks.registry import H6, H6_BY_TASK
from upstack.outputs import write_text_atomic

RESULTS_FORMAT = "upstack-eval/1"


def _metric_key(key: str) -> str | None:
    """lm-eval 'acc,none' -> 'acc'; 'exact_match,strict-match' stays; other keys (alias, ...) -> None."""
    if "," not in key:
        return None
    metric, filt = key.split(",", 1)
    return metric if filt == "none" else f"{metric},{filt}"


def convert_results(res: dict, names: list[str]) -> dict:
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
    for r in out.get("replies") or []:
        lines += ["", f"> {r.get('prompt') or r['messages'][-1]['content']}", "", r["reply"]]
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


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("upstack", "lm_eval", "transformers", "torch"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out
