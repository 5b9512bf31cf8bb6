"""Benchmark `upstack merge-adapter` against copying its output with `cp -r`, and PEFT's merge_and_unload.

Builds the synthetic Mistral-7B-shaped bf16 checkpoint the upscale bench uses (8 layers, ~4 GB) and a
random rank-16 LoRA adapter on every linear module in PEFT's file layout, then times, each followed by
`sync`:
  merge-adapter : `upstack merge-adapter BASE ADAPTER OUT --quiet` (peak RSS via /usr/bin/time)
  copy          : `cp -r OUT COPY`
  peft          : PeftModel.from_pretrained(base) + merge_and_unload() + save_pretrained (bf16)
and checks that the two merged outputs agree (max abs difference over every tensor).
Targets (issue 14): merge-adapter <= 1.5x the copy time, peak RSS <= 600 MB.
Appends the figures to bench/RESULTS.md.

usage: python bench/merge_adapter.py [--work DIR] [--layers 8] [--repeat 2] [--no-peft] [--no-record]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import record, timed  # noqa: E402
from synthetic_ckpt import build_mistral_like, mistral_shapes  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RANK = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_MERGE = r"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
merged.save_pretrained(out)
"""

COMPARE = r"""
import sys, torch
from safetensors import safe_open
from pathlib import Path
def tensors(folder):
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                yield k, h, f
ours = {k: f for k, _, f in tensors(sys.argv[1])}
worst, n, diff = 0.0, 0, 0
for k, h, _ in tensors(sys.argv[2]):
    with safe_open(ours[k], "pt") as o:
        a, b = o.get_tensor(k).float(), h.get_tensor(k).float()
    worst = max(worst, (a - b).abs().max().item())
    diff += int((a != b).sum()); n += a.numel()
print(worst, diff / max(n, 1))
"""


def write_adapter(folder: Path, layers: int, seed: int = 0) -> Path:
    """A PEFT LoRA adapter (rank 16, every linear module), random A and B, saved as PEFT saves it."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in mistral_shapes(layers):
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] not in TARGETS:
            continue
        out_f, in_f = shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.01
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.01
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(TARGETS),
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "base_model_name_or_path": None}))
    return folder


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "merge_adapter"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    base, adapter = work / "base", work / "adapter"
    if not base.exists():
        print(f"building a synthetic {args.layers}-layer Mistral-shaped checkpoint in {base} ...", flush=True)
        build_mistral_like(base, args.layers)
    if not adapter.exists():
        write_adapter(adapter, args.layers)
    out, copy, peft_out = work / "out", work / "copy", work / "peft"
    load = os.getloadavg()
    runs = []
    for _ in range(args.repeat):
        for p in (out, copy):
            shutil.rmtree(p, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        t_m, rss = timed([sys.executable, "-m", "upstack.cli", "merge-adapter", str(base), str(adapter), str(out),
                          "--quiet"])
        t_c, _ = timed(["cp", "-r", str(out), str(copy)])
        runs.append((t_m / t_c, t_m, t_c, rss))
        print(f"  merge-adapter {t_m:.2f}s, cp -r {t_c:.2f}s, ratio {t_m / t_c:.2f}x, peak RSS {rss / 1e6:.0f} MB",
              flush=True)
    ratio, t_m, t_c, rss = sorted(runs)[len(runs) // 2]
    peft = None
    if not args.no_peft:
        shutil.rmtree(peft_out, ignore_errors=True)
        t_p, rss_p = timed([sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(peft_out)])
        cmp = subprocess.run([sys.executable, "-c", COMPARE, str(out), str(peft_out)], capture_output=True,
                             text=True, check=True).stdout.split()
        peft = (t_p, rss_p, float(cmp[0]), float(cmp[1]))
        print(f"  peft merge_and_unload + save_pretrained {t_p:.2f}s ({t_p / t_c:.2f}x), peak RSS {rss_p / 1e9:.2f} GB;"
              f" max abs diff {peft[2]:.3g} ({100 * peft[3]:.2f}% of elements differ)", flush=True)
    size = dir_bytes(out)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"\n## merge-adapter vs `cp -r` of its output, and PEFT — {datetime.date.today()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, python {platform.python_version()}\n",
        f"Synthetic Mistral-7B-shaped bf16 checkpoint, {args.layers} layers ({size / 1e9:.2f} GB), random rank-{RANK} "
        "adapter on every linear module. Each timing includes `sync`; median paired ratio of "
        f"{args.repeat} run(s) (all: {', '.join(f'{r[0]:.2f}x' for r in runs)}). Load average at the start: "
        f"{load[0]:.1f}. Targets: <= 1.5x the copy time, peak RSS <= 600 MB.\n",
        "| tool | time | vs cp -r | peak RSS |", "|---|---|---|---|",
        f"| upstack merge-adapter | {t_m:.1f} s | {ratio:.2f}x | {rss / 1e6:.0f} MB |",
        f"| cp -r of the output | {t_c:.1f} s | 1.00x | - |",
    ]
    if peft:
        lines.append(f"| PEFT merge_and_unload + save_pretrained | {peft[0]:.1f} s | {peft[0] / t_c:.2f}x | "
                     f"{peft[1] / 1e9:.2f} GB |")
        lines.append(f"\nOutputs: max abs difference {peft[2]:.3g}, {100 * peft[3]:.2f}% of elements differ (PEFT rounds "
                     "the delta to bf16 before adding it; we add in fp32 and round once).")
    record("\n".join(lines) + "\n", not args.no_record)


if __name__ == "__main__":
    main()
