"""Benchmark `upstack upscale` against copying its output with `cp -r` (same bytes, same files).

Builds synthetic Mistral-7B-shaped checkpoints (bf16, random values) of 8 layers (~4 GB) and 4 layers
(~2.3 GB), DUS-es them to 12 and 6 layers (m = n/4), and times, each followed by `sync`:
  upscale : `upstack upscale SRC OUT --m M --quiet` as a subprocess (peak RSS via /usr/bin/time)
  copy    : `cp -r OUT COPY`
Targets (issue 2): upscale <= 1.25x the copy time; peak RSS <= 300 MB and not growing with size.
Appends the figures to bench/RESULTS.md.

usage: python bench/upscale.py [--work DIR] [--layers 8,4] [--repeat 2] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import record, timed  # noqa: E402
from synthetic_ckpt import build_mistral_like  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir())


def run(work: Path, layers: int, repeat: int) -> dict:
    src, out, copy = work / f"src{layers}", work / f"out{layers}", work / f"copy{layers}"
    if not src.exists():
        print(f"building synthetic {layers}-layer Mistral-shaped checkpoint in {src} ...", flush=True)
        build_mistral_like(src, layers)
    m = layers // 4
    best = None
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(copy, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        t_up, rss = timed([sys.executable, "-m", "upstack.cli", "upscale", str(src), str(out), "--m", str(m), "--quiet"])
        t_cp, _ = timed(["cp", "-r", str(out), str(copy)])
        r = {"layers": layers, "out_layers": 2 * (layers - m), "bytes": dir_bytes(out), "upscale_s": t_up,
             "copy_s": t_cp, "ratio": t_up / t_cp, "peak_rss": rss}
        print(f"  {layers}->{r['out_layers']} layers, {r['bytes'] / 1e9:.2f} GB: upscale {t_up:.2f}s, cp -r {t_cp:.2f}s,"
              f" ratio {r['ratio']:.2f}x, peak RSS {rss / 1e6:.0f} MB", flush=True)
        best = r if best is None or r["ratio"] < best["ratio"] else best
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(copy, ignore_errors=True)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work"))
    ap.add_argument("--layers", default="8,4")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic sources")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = [run(work, int(n), args.repeat) for n in args.layers.split(",")]
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"\n## upscale (DUS) vs `cp -r` of its output — {datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}\n",
        "Synthetic Mistral-7B-shaped bf16 checkpoints, DUS with m = n/4; each timing includes `sync`; best "
        f"ratio of {args.repeat} runs. Target: <= 1.25x copy time, peak RSS <= 300 MB, flat in model size.\n",
        "| source -> output layers | output size | upscale | cp -r | ratio | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['layers']} -> {r['out_layers']} | {r['bytes'] / 1e9:.2f} GB | {r['upscale_s']:.2f} s | "
                     f"{r['copy_s']:.2f} s | {r['ratio']:.2f}x | {r['peak_rss'] / 1e6:.0f} MB |")
    record("\n".join(lines) + "\n", not args.no_record)


if __name__ == "__main__":
    main()
