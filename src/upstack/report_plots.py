"""The report's plots: PNG curves of what `upstack pretrain/sft/dpo` log in metrics.jsonl (by step within
each stage), and held-out perplexity of the continued-pretraining stages by tokens seen."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

from upstack.outputs import write_file


def _read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


TOKENS_PLOT = "plot_heldout_by_tokens.png"  # held-out perplexity of continued pretraining by tokens seen
PLOT_INDEX = ".plots.json"  # {png name: hash of the data plotted}: unchanged curves are not drawn again
TIE = 1e-4  # |reward margin| below this: the policy still equals the reference (every implicit reward 0)

# (file, title, y label, stage kind, [(metrics key, "training" | "held-out")], y limits)
PLOTS = [
    ("plot_loss.png", "LM loss (token cross-entropy): pretraining and SFT stages", "loss", "lm",
     [("loss", "training"), ("eval_loss", "held-out")], None),
    ("plot_dpo_loss.png", "DPO loss", "DPO loss", "dpo", [("loss", "training"), ("eval_loss", "held-out")], None),
    ("plot_rewards_margin.png", "DPO reward margin (chosen - rejected implicit reward)", "reward margin", "dpo",
     [("rewards/margin", "training"), ("eval_rewards/margin", "held-out")], None),
    ("plot_rewards_accuracy.png", "DPO reward accuracy (chosen reward > rejected)", "reward accuracy", "dpo",
     [("rewards/accuracy", "training"), ("eval_rewards/accuracy", "held-out")], (0.0, 1.0)),
]
PLOT_NOTES = {
    "plot_loss.png": "Training loss (solid, per logged step) and held-out loss (dashed, evaluated every "
                     "`eval_steps` and at the end) of each training stage; each stage counts its own steps from 0.",
    "plot_dpo_loss.png": "DPO's loss is -log σ(β · reward margin) (+ the chosen answers' NLL with `rpo_alpha`), "
                         "not a language-model loss: it has its own plot.",
    TOKENS_PLOT: "Held-out perplexity (exp of the held-out loss on the stage's `eval_data`, or "
                                  "its held-out share) of each continued-pretraining stage by training tokens seen; "
                                  "the point at 0 tokens is the starting model (`eval_on_start: true`).",
    "plot_rewards_accuracy.png": "The first step is left out when its reward margin is 0: the policy still equals "
                                 "the reference there, every implicit reward is 0 and the accuracy counts rounding "
                                 "ties.",
}


def _series(rows: list[dict], key: str, split: str, kind: str) -> list[tuple]:
    want = "eval" if split == "held-out" else "train"
    pts = [(r["step"], r[key]) for r in rows
           if key in r and r.get("step") is not None and (r.get("type") or "train") == want]
    if key.endswith("rewards/accuracy"):  # drop the tie at the start (policy == reference)
        margin = key.replace("accuracy", "margin")
        tie = {r["step"] for r in rows if (r.get("type") or "train") == want and abs(r.get(margin, 1.0)) < TIE}
        pts = [p for p in pts if p[0] not in tie]
    return pts


def _token_series(rows: list[dict]) -> list[tuple]:
    """(tokens seen, held-out perplexity) of a stage's eval records that carry `tokens`."""
    return [(r["tokens"], math.exp(min(r["eval_loss"], 50.0))) for r in rows
            if (r.get("type") == "eval" and isinstance(r.get("tokens"), int)
                and isinstance(r.get("eval_loss"), (int, float)))]


def plot_curves(run_dir: Path, curves: dict[str, list[dict]], types: dict[str, str]) -> list[str]:
    """Every plot of the report whose data the run has: the PLOTS by step, then held-out perplexity by tokens."""
    written = _plot(run_dir, curves, types)
    series = {s: _token_series(rows) for s, rows in curves.items() if types.get(s) == "pretrain"}
    series = {s: pts for s, pts in series.items() if len(pts) > 1}
    if series:
        written.append(_plot_tokens(run_dir, series))
    return written


def _plot_tokens(run_dir: Path, series: dict[str, list[tuple]]) -> str:
    fname = TOKENS_PLOT
    index = _read_json(run_dir / PLOT_INDEX) or {}
    digest = hashlib.sha256(json.dumps(["tokens", series], default=str).encode()).hexdigest()
    if index.get(fname) == digest and (run_dir / fname).is_file():
        return fname
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (stage, pts) in enumerate(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", marker="o", markersize=3, label=stage)
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Held-out perplexity along continued pretraining", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    write_file(run_dir / fname, png.getvalue())
    plt.close(fig)
    index[fname] = digest
    write_file(run_dir / PLOT_INDEX, json.dumps(index, indent=1) + "\n")
    return fname


def _plot(run_dir: Path, curves: dict[str, list[dict]], types: dict[str, str]) -> list[str]:
    """PNG curves of what `upstack pretrain/sft/dpo` log in metrics.jsonl, one plot per kind of loss (LM
    stages; DPO), training and held-out together. The report is rewritten after every stage; a plot whose
    data is unchanged is kept."""
    index = _read_json(run_dir / PLOT_INDEX) or {}
    written, todo = [], []
    for fname, title, ylabel, kind, keys, ylim in PLOTS:
        stages = [s for s in curves if (types.get(s) == "dpo") == (kind == "dpo")]
        series = {s: {split: _series(curves[s], key, split, kind) for key, split in keys} for s in stages}
        series = {s: {k: v for k, v in sp.items() if v} for s, sp in series.items()}
        series = {s: sp for s, sp in series.items() if sp}
        if not series:
            continue
        digest = hashlib.sha256(json.dumps([title, ylabel, ylim, series], default=str).encode()).hexdigest()
        written.append(fname)
        if index.get(fname) != digest or not (run_dir / fname).is_file():
            todo.append((fname, title, ylabel, ylim, series, digest))
    if todo:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for fname, title, ylabel, ylim, series, digest in todo:
            fig, ax = plt.subplots(figsize=(7, 4))
            for i, (stage, splits) in enumerate(series.items()):
                color = f"C{i % 10}"
                for split, pts in splits.items():
                    held = split == "held-out"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, linestyle="--" if held else "-",
                            marker="o" if held or len(pts) < 30 else None, markersize=3 if held else 2,
                            label=f"{stage} ({split})")
            ax.set_xlabel("step within each stage")
            ax.set_ylabel(ylabel)
            if ylim:
                ax.set_ylim(*ylim)
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            png = io.BytesIO()
            fig.savefig(png, format="png", dpi=110)
            write_file(run_dir / fname, png.getvalue())
            plt.close(fig)
            index[fname] = digest
        write_file(run_dir / PLOT_INDEX, json.dumps(index, indent=1) + "\n")
    return written
