"""Held-out perplexity against training tokens for the seam study (recipes/smollm2-seam.yaml).

    python bench/seam_study.py runs/smollm2-seam [--png docs/seam_study.png]

Reads each `*_cpt` stage's metrics.jsonl (the `eval` records: step 0 from `eval_on_start`, then every
`eval_steps`; tokens from the `train` records of the same step) and prints a markdown table (step-0 and
final held-out perplexity, the final minus step-0 change) and, with --png, one panel per depth with the
base's curve in each."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def curves(run_dir: Path) -> dict[str, list[tuple[int, int, float]]]:
    """{stage: [(step, tokens, eval perplexity), ...]} for every trained stage of the run."""
    out = {}
    for metrics in sorted(run_dir.glob("*_cpt/metrics.jsonl")):
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        tokens = {r["step"]: r["tokens"] for r in rows if r.get("type") == "train"}
        tokens[0] = 0
        out[metrics.parent.name] = [(r["step"], tokens.get(r["step"]), math.exp(r["eval_loss"]))
                                    for r in rows if r.get("type") == "eval"]
    return out


def table(data: dict) -> str:
    lines = ["| model | layers | step-0 perplexity | final perplexity | tokens | change |", "|---|---|---|---|---|---|"]
    order = ["base_cpt"] + sorted((s for s in data if s != "base_cpt"), key=lambda s: (-int(s[-6:-4]), s[0] != "s"))
    for stage, pts in ((s, data[s]) for s in order if s in data):
        layers = json.loads((Path(RUN) / stage / "config.json").read_text())["num_hidden_layers"]
        (_, _, p0), (_, tok, p1) = pts[0], pts[-1]
        lines.append(f"| {stage} | {layers} | {p0:.2f} | {p1:.2f} | {tok:,} | {100 * (p1 / p0 - 1):+.1f}% |")
    return "\n".join(lines)


def same_block(depth: str) -> bool:
    """Whether the auto seam chose SOLAR's own cut at this depth (then the two checkpoints are the same)."""
    meta = Path(RUN) / f"auto{depth}" / "upstack.json"
    seam = json.loads(meta.read_text())["upscale"].get("seam", {}) if meta.is_file() else {}
    return bool(seam) and seam.get("start") == seam.get("solar_start")


def plot(data: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({s[len("solar"):-len("_cpt")] for s in data if s.startswith("solar")}, reverse=True)
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 3.6), sharey=True, squeeze=False)
    for ax, depth in zip(axes[0], depths):
        for stage, style in ((f"solar{depth}_cpt", "C0"), (f"auto{depth}_cpt", "C1"), ("base_cpt", "C7")):
            if stage in data:
                xs, ys = [t for _, t, _ in data[stage]], [p for _, _, p in data[stage]]
                label = {"base_cpt": "base (30 layers)"}.get(stage, ("SOLAR cut" if stage.startswith("solar")
                                                                     else "auto seam") + f" ({depth} layers)")
                if stage.startswith("solar") and same_block(depth):
                    label = f"SOLAR cut = auto seam ({depth} layers)"
                ax.plot(xs, ys, marker="o", ms=3, color=style, label=label)
        ax.set_title(f"{depth} layers")
        ax.set_xlabel("training tokens (C4)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("held-out perplexity (WikiText-2 test)")
    fig.suptitle("SmolLM2-135M-Instruct up-scaled: continued pretraining", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--png")
    args = ap.parse_args()
    RUN = args.run_dir
    data = curves(Path(args.run_dir))
    print(table(data))
    if args.png:
        plot(data, args.png)
        print(f"wrote {args.png}")
