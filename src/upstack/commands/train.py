"""`upstack pretrain | sft | dpo`: the training stages (see docs/training.md)."""

from __future__ import annotations

import argparse
import os

from upstack.commands.output import print_json
from upstack.config import config_from_dict, parse_bytes
from upstack.errors import ConfigError
from upstack.lm import model_config
from upstack.train.config import check_config
from upstack.train.memory import format_plan, stage_memory_plan
from upstack.train.sharding import launch_plan

ORDER = 20

_STAGES = {
    "pretrain": ("upstack.train.pretrain", "PretrainConfig", "pretrain",
                 "continued pretraining on raw text packed into fixed-length blocks"),
    "sft": ("upstack.train.sft", "SFTConfig", "sft", "instruction tuning with the loss on responses only"),
    "dpo": ("upstack.train.dpo", "DPOConfig", "dpo", "Direct Preference Optimization against a frozen reference"),
}


def register(subparsers, common) -> None:
    for name, (_, _, _, help_text) in _STAGES.items():
        p = subparsers.add_parser(name, parents=[common], help=help_text, description=help_text + " (docs/training.md)")
        _add_common(p, name)
        if name == "pretrain":
            p.add_argument("--seq-len", "--max-length", dest="max_length", type=int,
                           help="block length in tokens (default 2048)")
            p.add_argument("--eval-fraction", type=float, help="share of blocks held out for eval (default 0.01)")
        else:
            p.add_argument("--max-length", type=int, help="longer sequences are truncated, and counted "
                           f"(default {2048 if name == 'sft' else 1024})")
            p.add_argument("--eval-fraction", type=float, help="share of rows held out for eval (default 0)")
            p.add_argument("--template", choices=["auto", "chat", "alpaca"],
                           help="auto (default): the tokenizer's chat template, else alpaca; chat: the tokenizer's; "
                                "alpaca: '### User: / ### Assistant:' as SOLAR used")
        if name == "sft":
            p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                           help="pack several examples per row (default: on where attention stops at example "
                                "boundaries, else off)")
        if name == "dpo":
            p.add_argument("--beta", type=float, help="strength of the pull towards the reference (default 0.1)")
            p.add_argument("--loss-type", choices=["sigmoid", "ipo", "hinge"], help="default sigmoid (DPO)")
            p.add_argument("--label-smoothing", type=float, help="sigmoid loss: share of flipped labels (default 0)")
            p.add_argument("--rpo-alpha", type=float, help="add ALPHA x the chosen answers' per-token NLL to the "
                           "loss (RPO; default 0 = plain DPO)")
            p.add_argument("--ref-model", metavar="DIR", help="reference model (default: MODEL itself)")
            p.add_argument("--precompute-ref", action=argparse.BooleanOptionalAction, default=None,
                           help="score the reference once before training and free it (default: on)")
        p.set_defaults(func=_run, stage=name)


def _add_common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("model", metavar="MODEL", help="input checkpoint folder (Hugging Face format)")
    p.add_argument("--data", nargs="+", action="extend", required=True, metavar="SPEC",
                   help="data sources: PATH[:format=...,samples=N,weight=W,seed=S,filter=...] (docs/data.md)")
    p.add_argument("--eval-data", nargs="+", action="extend", metavar="SPEC", help="held-out data sources")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint folder")
    p.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float,
                   help={"pretrain": "default 1e-4", "sft": "default 2e-5", "dpo": "default 5e-7"}[name])
    p.add_argument("--lr-scheduler", choices=["cosine", "linear", "constant"], help="after warmup (default cosine)")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--warmup-ratio", type=float, help="warmup as a share of the steps (when --warmup-steps is 0)")
    p.add_argument("--min-lr-ratio", type=float, help="final learning rate as a share of --lr (default 0)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0; 0 = off)")
    p.add_argument("--batch-size", type=int, help="per process and micro-batch (default 8)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: from --epochs)")
    p.add_argument("--epochs", type=float, help="passes over the data (default 1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", choices=["fp32", "bf16", "bf16-mixed"],
                   help="fp32 (default); bf16: bf16 weights; bf16-mixed: fp32 weights with bf16 autocast")
    p.add_argument("--save-dtype", help="dtype of the saved model (default: the input's)")
    p.add_argument("--gradient-checkpointing", action="store_true", default=None)
    p.add_argument("--attn-implementation", help="sdpa, eager, flash_attention_2, ... (default: transformers')")
    p.add_argument("--pad-to-multiple-of", type=int, help="round batch widths up to a multiple of N "
                   "(default: 64 on CUDA, where each new width costs kernel selection; 1 on CPU)")
    p.add_argument("--train-layers", help="all (default), new (blocks added by upscale --method interleave), "
                   "or indices and ranges such as 0-3,8")
    g = p.add_argument_group("LoRA / QLoRA (PEFT adapters; the output is the merged model plus OUT/adapter/)")
    g.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters instead of the full model")
    g.add_argument("--qlora", action="store_true", default=None,
                   help="--lora on a base loaded in 4-bit NF4 with double quantization (bitsandbytes); needs "
                        "--dtype bf16 or bf16-mixed; the merge goes into the unquantized base")
    g.add_argument("--lora-r", type=int, help="adapter rank (default 16)")
    g.add_argument("--lora-alpha", type=float, help="scale numerator (default 2 x r)")
    g.add_argument("--lora-dropout", type=float, help="dropout on the adapter input (default 0.05)")
    g.add_argument("--lora-targets", help="all-linear (default: every linear module but the head) or module names, "
                                          "e.g. q_proj,v_proj; with --train-layers only in those layers")
    g.add_argument("--lora-modules-to-save",
                   help="modules trained and saved whole, e.g. embed_tokens,lm_head "
                        "(continued pretraining on new vocabulary)")
    g.add_argument("--use-rslora", action="store_true", default=None, help="rank-stabilised scale alpha / sqrt(r)")
    g.add_argument("--use-dora", action="store_true", default=None, help="weight-decomposed LoRA (DoRA)")
    g.add_argument("--adapter-only", action="store_true", default=None,
                   help="write only OUT/adapter (merge later with upstack merge-adapter)")
    p.add_argument("--save-steps", type=int, help="resumable checkpoint every N steps (default 500; 0: only on Ctrl-C)")
    p.add_argument("--save-total-limit", type=int, help="resumable checkpoints kept (default 2)")
    p.add_argument("--eval-steps", type=int, help="eval every N steps (default: at the end)")
    p.add_argument("--eval-at-start", action="store_true", default=None,
                   help="also eval the starting model, at step 0 (the first point of the held-out curve)")
    p.add_argument("--logging-steps", type=int, help="metrics every N steps (default 10)")
    p.add_argument("--skip-bad-rows", action="store_true", default=None, help="skip malformed rows, and report them")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint in OUT.work")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace OUT (and discard OUT.work)")
    p.add_argument("--keep-checkpoints", action="store_true", default=None, help="keep OUT.work after success")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None)
    p.add_argument("--report-to", metavar="NAMES",
                   help="experiment trackers, comma-separated: tensorboard (default), wandb, mlflow, trackio, or none; "
                        "each gets the metrics of metrics.jsonl and the run config (offline: WANDB_MODE=offline, "
                        "MLFLOW_TRACKING_URI=sqlite:///mlflow.db, TRACKIO_DIR=DIR)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the options and print the memory plan (full, LoRA, QLoRA) from MODEL's config.json; "
                        "train nothing")
    p.add_argument("--gpu-memory", metavar="SIZE", help="with --dry-run: the memory of one GPU, e.g. 24GB or 80GiB: "
                   "say which methods fit and how many GPUs each needs under FSDP")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


_NOT_CONFIG = {"func", "stage", "debug", "quiet", "json", "command", "dry_run", "gpu_memory"}


def _run(args) -> int:
    import importlib

    module, cls_name, fn_name, _ = _STAGES[args.stage]
    mod = importlib.import_module(module)
    options = {k: v for k, v in vars(args).items() if k not in _NOT_CONFIG and v is not None}
    if args.quiet:
        options["progress"] = False
    cfg = config_from_dict(getattr(mod, cls_name), options, "options")
    if args.dry_run:
        return _dry_run(args, cfg, getattr(mod, f"check_{args.stage}_config", check_config))
    if args.gpu_memory:
        raise ConfigError("--gpu-memory goes with --dry-run (it sizes the memory plan)")
    summary = getattr(mod, fn_name)(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # one report per launch, not one per process
        return 0
    if args.json:
        print_json(summary)
    else:
        print(_describe(args.stage, summary))
    return 0


def _describe(stage: str, s: dict) -> str:
    parts = [f"{s['steps']} steps", f"loss {s.get('final_loss', float('nan')):.4f}"]
    if "eval_loss" in s:
        parts.append(f"eval loss {s['eval_loss']:.4f}")
    if "eval_perplexity" in s:
        parts.append(f"eval perplexity {s['eval_perplexity']:.2f}")
    if stage == "dpo" and "final_rewards/margin" in s:
        parts.append(f"reward margin {s['final_rewards/margin']:.4f}, accuracy {s['final_rewards/accuracy']:.2f}")
    if s.get("tokens_per_s"):
        parts.append(f"{s['tokens_per_s']:,.0f} tokens/s")
    return f"{stage}: wrote {s['out']} ({', '.join(parts)})" + _skipped(s)


def _skipped(s: dict) -> str:
    """With --skip-bad-rows: how many rows were skipped, and why (by reason)."""
    reasons: dict[str, int] = {}
    for src in (s.get("data") or {}).get("sources", []):
        for reason, count in (src.get("skip_reasons") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + count
    if not s.get("skipped_rows") and not reasons:
        return ""
    other = (s.get("skipped_rows") or 0) - sum(reasons.values())
    if other > 0:
        reasons["could not be encoded (template or tokenizer)"] = other
    lines = [f"\nskipped {sum(reasons.values())} malformed row(s):"]
    lines += [f"  {count} x {reason}" for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def _dry_run(args, cfg, check) -> int:
    """The options checked and the memory plan printed; nothing read but MODEL's config.json."""
    check(cfg)
    config = model_config(cfg.model)
    if config is None:
        raise ConfigError(f"{cfg.model}: --dry-run plans from a local folder's config.json (none found)")
    gpu = parse_bytes(args.gpu_memory, "--gpu-memory") if args.gpu_memory else None
    plan = stage_memory_plan(cfg, args.stage, config, gpu)
    plan["launch"] = launch = launch_plan(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher: one plan per launch
        return 2 if "refused" in launch else 0
    if args.json:
        print_json(plan)
    else:
        print(f"{args.stage} of {cfg.model}: dry run, nothing trained")
        print(format_plan(plan))
        how = f"launch: {launch['processes']} process(es), sharding {launch['sharding']}"
        print(f"{how}: REFUSED: {launch['refused']}" if "refused" in launch else
              f"{how}{': ' + launch['note'] if 'note' in launch else ''}")
    return 2 if "refused" in launch else 0
