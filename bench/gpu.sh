#!/usr/bin/env bash
# Training throughput on one GPU: a ~1.1B-parameter Llama (TinyLlama-1.1B's shape: hidden 2048, 22 layers,
# vocab 32000) in bf16, seq 1024, batch 8 (DPO: 4 pairs), built from its config with random weights.
# Prints tokens/s and model FLOPs utilisation (6 N + attention FLOPs per trained token, against the GPU's
# dense bf16 peak) for a plain PyTorch loop and upstack's pretrain, sft (full, LoRA r 16 and QLoRA NF4 on
# every linear module; their MFU counts the full model's 6 N FLOPs per token) and dpo (plus TRL's DPOTrainer),
# and appends the table to bench/RESULTS.md.
#
#   bash bench/gpu.sh                 # all paths, 20 steps each
#   STEPS=30 bash bench/gpu.sh --only plain,sft,sft-lora,sft-qlora --no-record
#
# Runs from a bare checkout (PYTHONPATH=src); needs torch with CUDA, transformers, accelerate, trl,
# datasets, tokenizers; peft and bitsandbytes for the LoRA/QLoRA rows.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TQDM_DISABLE=1
PY="${PYTHON:-$(command -v python || command -v python3)}"
"$PY" - <<'PY'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA GPU is visible (use bench/train.py for the CPU benchmark)")
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}")
PY
exec "$PY" bench/train.py --preset gpu1b --steps "${STEPS:-20}" --rounds 1 --work "${WORK:-/tmp/upstack-bench}" "$@"
