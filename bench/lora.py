"""Benchmark full vs LoRA vs QLoRA SFT on this machine: peak memory (RSS) and tokens/s, as ratios to full.

Builds a ~100M-parameter Llama (hidden 640, 12 layers, MLP 1728, Mistral's 32k vocabulary) and an SFT set
of long alpaca rows, then runs `upstack sft` three times, each in its own process (peak RSS from
/usr/bin/time): full fine-tuning (fp32), `--lora` (r 16, every linear module, fp32 base) and `--qlora`
(r 16, NF4 base, bf16 compute), all at batch 2 x 512 tokens with gradient checkpointing, the same steps.
tokens/s is the median per-step rate over the logged steps after the first.
Targets (issue 14): LoRA peak memory <= 0.5x full, QLoRA <= 0.35x full; LoRA tokens/s >= 1.2x full.
Appends the figures to bench/RESULTS.md.

usage: python bench/lora.py [--work DIR] [--steps 6] [--threads 2] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import record, timed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = {"full": [], "lora": ["--lora"], "qlora": ["--qlora", "--dtype", "bf16"]}


def build(work: Path) -> tuple[Path, Path]:
    from tiny import build_tiny_model

    model = work / "model"
    if not model.exists():
        build_tiny_model(model, "llama", hidden_size=640, intermediate_size=1728, num_hidden_layers=12,
                         num_attention_heads=10, num_key_value_heads=5, vocab_size=32000,
                         max_position_embeddings=1024)
    data = work / "sft.jsonl"
    words = "the model learns to follow instructions about depth up scaling and merging".split()
    rows = [{"instruction": " ".join(words[(i + k) % len(words)] for k in range(120)), "input": "",
             "output": " ".join(words[(i * 3 + k) % len(words)] for k in range(300))} for i in range(64)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def run(method: str, model: Path, data: Path, work: Path, steps: int, threads: int) -> dict:
    out = work / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / f"out-{method}.work", ignore_errors=True)
    cmd = [sys.executable, "-c", f"import torch; torch.set_num_threads({threads}); "
           "from upstack.cli import main; raise SystemExit(main())",
           "sft", str(model), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
           "--batch-size", "2", "--max-length", "512", "--no-packing", "--gradient-checkpointing",
           "--logging-steps", "1", "--save-steps", "0", "--no-tensorboard", "-q", *METHODS[method]]
    seconds, rss = timed(cmd)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if r["type"] == "train" and r["step"] > 1]
    start = recs[0]
    return {"method": method, "peak_rss": rss, "tokens_per_s": statistics.median(rates), "seconds": seconds,
            "trainable": start["trainable"], "total": start["total"],
            "loss": [r["loss"] for r in recs if r["type"] == "train"][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "lora"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data = build(work)
    load = os.getloadavg()
    results = {}
    for method in METHODS:
        results[method] = r = run(method, model, data, work, args.steps, args.threads)
        print(f"  {method}: peak RSS {r['peak_rss'] / 1e6:,.0f} MB, {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['trainable']:,} of {r['total']:,} parameters trained", flush=True)
    full = results["full"]
    targets = {"lora": (0.5, 1.2), "qlora": (0.35, None)}
    lines = [
        f"\n## full vs LoRA vs QLoRA SFT on CPU (`bench/lora.py`) — {datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}\n",
        f"~{full['total'] / 1e6:.0f}M-parameter Llama (hidden 640, 12 layers, 32k vocabulary), SFT at batch 2 x 512 "
        f"tokens, gradient checkpointing, {args.steps} steps, {args.threads} torch threads; LoRA/QLoRA r 16 on every "
        "linear module; each run in its own process (peak RSS from /usr/bin/time; includes Python and torch). "
        f"Load average at the start: {load[0]:.1f}. Targets: LoRA memory <= 0.5x full and tokens/s >= 1.2x full; "
        "QLoRA memory <= 0.35x full.\n",
        "| method | trained parameters | peak RSS | vs full | tokens/s | vs full | final loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        mem, speed = r["peak_rss"] / full["peak_rss"], r["tokens_per_s"] / full["tokens_per_s"]
        t_mem, t_speed = targets.get(method, (None, None))
        mark_mem = "" if t_mem is None else (" (ok)" if mem <= t_mem else " (above target)")
        mark_speed = "" if t_speed is None else (" (ok)" if speed >= t_speed else " (below target)")
        lines.append(f"| {method} | {r['trainable']:,} | {r['peak_rss'] / 1e6:,.0f} MB | {mem:.2f}x{mark_mem} | "
                     f"{r['tokens_per_s']:,.0f} | {speed:.2f}x{mark_speed} | {r['loss']:.3f} |")
    record("\n".join(lines) + "\n", not args.no_record)


if __name__ == "__main__":
    main()
