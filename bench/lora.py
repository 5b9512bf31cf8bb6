"""Benchmark full vs LoRA vs QLoRA SFT on this machine: peak memory (RSS) and tokens/s, as ratios to full.

Builds a ~100M-parameter Llama (hidden 640, 12 layers, MLP 1728, Mistral's 32k vocabulary) and an SFT set
of long alpaca rows, then runs `upstack sft` three times, each in its own process (peak RSS from
/usr/bin/time): full fine-tuning, `--lora` (r 16, every linear module, dropout 0.05) and `--qlora` (r 16,
NF4 base), all at batch 2 x 512 tokens with gradient checkpointing, the same steps, each in the precision
it is used in: --dtype bf16-mixed (full: fp32 master weights and AdamW states, bf16 autocast; LoRA: the
frozen base in bf16, fp32 adapters; QLoRA: NF4 base, bf16 compute), or all in fp32 with --dtype fp32.
tokens/s is the median per-step rate over the logged steps after the first. Peak RSS includes Python,
torch and the libraries; "above idle" subtracts the peak RSS of the same command with --dry-run (the same
imports, config and tokenizer, no weights), which is the part that compares with GPU memory.
Targets (issue 14): LoRA peak memory <= 0.5x full, QLoRA <= 0.35x full; LoRA tokens/s >= 1.2x full.
Appends the figures to bench/RESULTS.md.

usage: python bench/lora.py [--work DIR] [--steps 10] [--threads 2] [--dtype bf16-mixed|fp32] [--repeat 5]
       [--no-record]
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
METHODS = {"full": [], "lora": ["--lora"], "qlora": ["--qlora"]}


def build(work: Path) -> tuple[Path, Path]:
    from tiny import build_tiny_model

    model = work / "model"
    if not model.exists():
        build_tiny_model(model, "llama", hidden_size=640, intermediate_size=1728, num_hidden_layers=12,
                         num_attention_heads=10, num_key_value_heads=5, vocab_size=32000,
                         max_position_embeddings=1024, dtype="bfloat16")  # as real bases ship
    data = work / "sft.jsonl"
    words = "the model learns to follow instructions about depth up scaling and merging".split()
    rows = [{"instruction": " ".join(words[(i + k) % len(words)] for k in range(120)), "input": "",
             "output": " ".join(words[(i * 3 + k) % len(words)] for k in range(300))} for i in range(64)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model, data


def run(method: str, model: Path, data: Path, work: Path, steps: int, threads: int, dtype: str) -> dict:
    out = work / f"out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work / f"out-{method}.work", ignore_errors=True)
    cmd = [sys.executable, "-c", f"import torch; torch.set_num_threads({threads}); "
           "from upstack.cli import main; raise SystemExit(main())",
           "sft", str(model), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
           "--batch-size", "2", "--max-length", "512", "--no-packing", "--gradient-checkpointing",
           "--logging-steps", "1", "--save-steps", "0", "--no-tensorboard", "-q", "--dtype", dtype, *METHODS[method]]
    _, idle = timed([*cmd, "--dry-run"])
    seconds, rss = timed(cmd)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in recs if r["type"] == "train" and r["step"] > 1]
    start = recs[0]
    return {"method": method, "peak_rss": rss, "idle_rss": idle, "tokens_per_s": statistics.median(rates), "seconds": seconds,
            "trainable": start["trainable"], "total": start["total"],
            "loss": [r["loss"] for r in recs if r["type"] == "train"][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "lora"))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bf16-mixed", choices=["bf16-mixed", "fp32"],
                    help="--dtype of the full and LoRA runs (QLoRA computes in bf16 either way)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="rounds of the three runs (median LoRA speed ratio); on a 2-core VM one method's speed "
                         "drifts by 5-10%% between runs minutes apart, as much as the 1.2x target's margin")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data = build(work)
    load = os.getloadavg()
    rounds = []   # each round runs every method once, so drift of the machine hits all of them alike
    for k in range(args.repeat):
        rounds.append({})
        for method in METHODS:
            dtype = "bf16-mixed" if method == "qlora" else args.dtype
            rounds[-1][method] = r = run(method, model, data, work, args.steps, args.threads, dtype)
            print(f"  round {k + 1} {method}: peak RSS {r['peak_rss'] / 1e6:,.0f} MB (idle {r['idle_rss'] / 1e6:,.0f} "
                  f"MB), {r['tokens_per_s']:,.0f} tokens/s, {r['trainable']:,} of {r['total']:,} parameters trained",
                  flush=True)
    def speed(rd, m):
        return rd[m]["tokens_per_s"] / rd["full"]["tokens_per_s"]

    speed_ratios = {m: sorted(speed(rd, m) for rd in rounds) for m in METHODS}
    # the round whose LoRA speed ratio is the median stands for the table; every round's ratio is listed
    results = sorted(rounds, key=lambda rd: speed(rd, "lora"))[len(rounds) // 2]
    full = results["full"]
    targets = {"lora": (0.5, 1.2), "qlora": (0.35, None)}
    lines = [
        f"\n## full vs LoRA vs QLoRA SFT on CPU (`bench/lora.py`) — {datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}\n",
        f"~{full['total'] / 1e6:.0f}M-parameter Llama (hidden 640, 12 layers, 32k vocabulary), SFT at batch 2 x 512 "
        f"tokens, gradient checkpointing, {args.steps} steps, {args.threads} torch threads, --dtype {args.dtype} "
        "(QLoRA: NF4 base, bf16 compute); LoRA/QLoRA r 16 on every linear module, dropout 0.05; each run in its "
        "own process (peak RSS from /usr/bin/time, including Python and torch; \"above idle\": minus the peak RSS "
        f"of the same command with --dry-run). {args.repeat} round(s) of the three runs; the table is the round with "
        "the median LoRA speed ratio; speed ratios of every round: "
        + "; ".join(f"{m} {', '.join(f'{x:.2f}x' for x in speed_ratios[m])}" for m in ("lora", "qlora"))
        + f". Load average at the start: {load[0]:.1f}. Targets: LoRA memory <= "
        "0.5x full and tokens/s >= 1.2x full; QLoRA memory <= 0.35x full.\n",
        "| method | trained parameters | peak RSS | vs full | above idle | vs full | tokens/s | vs full | final loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def mark(value, target, lower_is_better=True):
        if target is None:
            return ""
        return " (ok)" if (value <= target if lower_is_better else value >= target) else " (missed)"

    for method, r in results.items():
        mem, speed = r["peak_rss"] / full["peak_rss"], r["tokens_per_s"] / full["tokens_per_s"]
        above = r["peak_rss"] - r["idle_rss"]
        mem_above = above / (full["peak_rss"] - full["idle_rss"])
        t_mem, t_speed = targets.get(method, (None, None))
        lines.append(f"| {method} | {r['trainable']:,} | {r['peak_rss'] / 1e6:,.0f} MB | {mem:.2f}x{mark(mem, t_mem)} | "
                     f"{above / 1e6:,.0f} MB | {mem_above:.2f}x{mark(mem_above, t_mem)} | {r['tokens_per_s']:,.0f} | "
                     f"{speed:.2f}x{mark(speed, t_speed, False)} | {r['loss']:.3f} |")
    record("\n".join(lines) + "\n", not args.no_record)


if __name__ == "__main__":
    main()
