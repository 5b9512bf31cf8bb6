"""`upstack merge`."""

from __future__ import annotations

import argparse

from upstack.commands.output import (
    add_writer_flags,
    format_table,
    human_bytes,
    print_json,
)
from upstack.errors import ConfigError
from upstack.merge import (
    MergeAdapterConfig,
    MergeConfig,
    ModelEntry,
    config_from_yaml,
    format_param,
    merge,
    merge_adapter,
)

ORDER = 40

MERGE_HELP = """\
Merge fine-tuned variants of one model (SOLAR-10.7B-Instruct is a merge of DPO models).

Methods (computed in fp32, written in --dtype or each tensor's dtype in the base/first model):
  linear, average   sum_i w_i theta_i / sum_i w_i               --weights (default equal)
  slerp             spherical interpolation of two models        --t (0 = first model or --base)
  task_arithmetic   base + lambda sum_i w_i (theta_i - base)     --base --weights --lambda
  ties              top --density by magnitude, sign election,   --base --weights --density --lambda
                    average of the agreeing task-vector entries
  dare_linear       drop entries with prob. 1-density, rescale   --base --weights --density --lambda --seed
  dare_ties         by 1/density; then linear or TIES election

--t also takes a gradient over layer depth: --t 0,0.5,1 grows t from the first layer to the last.
The full form is a YAML config (mergekit's format works): per-model weights, per-tensor-group
parameters (filter: self_attn / mlp), gradients. See docs/merging.md.

The tokenizer, chat template and generation config come from the base (or first) model. A model
that ties lm_head to its embedding contributes the embedding to the merged lm_head; the output
ties only when every model does. Output is written to a temporary sibling folder and renamed.

examples:
  upstack merge dpo-a dpo-b --method average --out merged                   # SOLAR's 0.5/0.5
  upstack merge dpo-a dpo-b --method linear --weights 0.4,0.6 --out merged
  upstack merge dpo-a dpo-b --method slerp --t 0.5 --out merged
  upstack merge sft-a sft-b --method ties --base base --density 0.5 --out merged
  upstack merge --config merge.yaml --out merged --dry-run
"""


NONFINITE_HELP = "write merged tensors that hold NaN or inf (refused by default, naming the tensor)"

MERGE_ADAPTER_HELP = """\
Merge a PEFT LoRA adapter (ours from `--lora` training, or anyone's: rsLoRA, DoRA, rank/alpha patterns,
modules_to_save) into its base checkpoint, tensor by tensor: W + scale x B @ A computed in fp32 and written
in the base tensor's dtype; every other tensor is copied byte for byte. Memory stays bounded by one
chunk of the largest tensor (PEFT's merge_and_unload holds the whole model). An adapter trained on
another base (a module or shape that does not match) is refused before anything is written. For a
QLoRA adapter, BASE is the unquantized checkpoint it was trained from.

examples:
  upstack merge-adapter ./solar-base ./sft-lora/adapter ./sft-merged
  upstack merge-adapter ./base ./adapter ./merged --dtype bfloat16 --dry-run
"""


def register(sub, common) -> None:
    p = sub.add_parser("merge", parents=[common], help="merge models (linear, slerp, task arithmetic, ties, dare)",
                       description=MERGE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL", help="checkpoint folders to merge (or use --config)")
    p.add_argument("--config", default=None, help="merge YAML: models, method, base, parameters (mergekit format works)")
    p.add_argument("--method", default=None,
                   help="linear | average | slerp | task_arithmetic | ties | dare_linear | dare_ties")
    p.add_argument("--out", default=None, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--base", default=None, help="base model: task vectors are differences from it; slerp's t=0 end; "
                                                "source of tokenizer and config")
    p.add_argument("--weights", default=None, help="comma-separated weight per MODEL, e.g. 0.6,0.4")
    p.add_argument("--t", default=None, help="slerp: 0..1, or a gradient over depth like 0,0.5,1")
    p.add_argument("--density", type=float, default=None, help="ties/dare: fraction of each task vector kept (0, 1]")
    p.add_argument("--lambda", dest="lam", type=float, default=None, help="scale of the merged task vector (default 1)")
    p.add_argument("--seed", type=int, default=None, help="seed of DARE's random drop (default 0)")
    p.add_argument("--dtype", default=None, help="output dtype (float32, bfloat16, float16); default: the inputs'")
    add_writer_flags(p, dry_run="check everything and print the plan; write nothing", shard_default=None)
    p.add_argument("--workers", type=int, default=None,
                   help="compute threads (default: one per CPU this process may use, at most 8)")
    p.add_argument("--allow-nonfinite", action="store_true", help=NONFINITE_HELP)
    p.set_defaults(func=run_merge)

    p = sub.add_parser("merge-adapter", parents=[common], help="merge a PEFT LoRA adapter into its base checkpoint",
                       description=MERGE_ADAPTER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="the base checkpoint the adapter was trained on (unquantized)")
    p.add_argument("adapter", metavar="ADAPTER", help="PEFT adapter folder (adapter_config.json, "
                                                      "adapter_model.safetensors)")
    p.add_argument("out", metavar="OUT", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default=None, help="output dtype of floating tensors (float32, bfloat16, float16); "
                                                 "default: each base tensor's own")
    add_writer_flags(p, dry_run="check base and adapter, print the plan; write nothing", pickle_what="base weights")
    p.add_argument("--allow-nonfinite", action="store_true", help=NONFINITE_HELP)
    p.set_defaults(func=run_merge_adapter)


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated numbers, e.g. 0.6,0.4") from None


def config_from_args(args):
    """A MergeConfig from the command line (flags) or --config (flags may set out/dtype/seed/... only)."""
    common = {"out": args.out, "dtype": args.dtype, "seed": args.seed, "shard_size": args.shard_size,
              "overwrite": args.overwrite or None, "dry_run": args.dry_run or None,
              "allow_pickle": args.allow_pickle or None, "allow_nonfinite": args.allow_nonfinite or None,
              "quiet": args.quiet or None, "workers": args.workers}
    if args.config:
        given = [f for f, v in (("MODEL", args.models), ("--method", args.method), ("--base", args.base),
                                ("--weights", args.weights), ("--t", args.t), ("--density", args.density),
                                ("--lambda", args.lam)) if v not in (None, [])]
        if given:
            raise ConfigError(f"{', '.join(given)}: with --config, models, method and parameters come from the "
                              "config file (flags may set --out, --dtype, --seed, --shard-size, --workers, --overwrite, "
                              "--dry-run, --allow-pickle, --allow-nonfinite)")
        return config_from_yaml(args.config, **common)
    if not args.models:
        raise ConfigError("no models given: upstack merge MODEL_A MODEL_B --method M --out DIR (or --config FILE)")
    if not args.method:
        raise ConfigError("--method is required (linear, average, slerp, task_arithmetic, ties, dare_linear, "
                          "dare_ties)")
    weights = _floats(args.weights, "--weights") if args.weights else None
    if weights is not None and len(weights) != len(args.models):
        raise ConfigError(f"--weights has {len(weights)} value(s) for {len(args.models)} model(s)")
    models = [ModelEntry(m, weight=weights[i] if weights else None) for i, m in enumerate(args.models)]
    params: dict = {}
    if args.t is not None:
        t = _floats(args.t, "--t")
        if not t:
            raise ConfigError(f"--t {args.t!r}: expected a number or a comma-separated gradient")
        params["t"] = t[0] if len(t) == 1 else t
    if args.density is not None:
        params["density"] = args.density
    if args.lam is not None:
        params["lambda"] = args.lam
    kwargs = {k: v for k, v in common.items() if v is not None}
    return MergeConfig(models=models, method=args.method, base=args.base, parameters=params, **kwargs)


def run_merge(args) -> int:
    cfg = config_from_args(args)
    report = merge(cfg)
    if args.json:
        print_json(report)
        return 0
    if args.quiet:  # the result only: no tables or notes
        print("dry run: nothing written" if report["dry_run"] else f"wrote {report['out']}")
        return 0
    what = f"{report['method']} of {len(report['models'])} model(s)"
    if report["base"]:
        what += f" with base {report['base']}"
    print(what + ":")
    for m in report["models"]:
        print(f"  {m}")
    rows = [[g["group"], g["tensors"], ", ".join(f"{k}={format_param(v)}" for k, v in g["params"].items())]
            for g in report["groups"]]
    print(format_table(["tensors", "n", "parameters"], rows))
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"{report['num_tensors']} tensors, {report['num_parameters']:,} parameters, output "
          f"{human_bytes(report['output_bytes'])} in {report['num_shards']} shard(s), dtype {report['output_dtype']}, "
          f"tie_word_embeddings={str(report['tie_word_embeddings']).lower()}")
    print("dry run: nothing written" if report["dry_run"] else f"wrote {report['out']}")
    return 0


def run_merge_adapter(args) -> int:
    cfg = MergeAdapterConfig(base=args.base, adapter=args.adapter, out=args.out, dtype=args.dtype,
                             shard_size=args.shard_size, overwrite=args.overwrite, dry_run=args.dry_run,
                             allow_pickle=args.allow_pickle, allow_nonfinite=args.allow_nonfinite, quiet=args.quiet)
    report = merge_adapter(cfg)
    if args.json:
        print_json(report)
        return 0
    kind = "DoRA" if report["use_dora"] else ("rsLoRA" if report["use_rslora"] else "LoRA")
    print(f"{kind} adapter {report['adapter']} (r={report['r']}, alpha={report['lora_alpha']}): {report['modules']} "
          f"merged tensors, {len(report['replaced_tensors'])} taken whole, into {report['base']}")
    print(f"{report['num_tensors']} tensors, {report['num_parameters']:,} parameters, output "
          f"{human_bytes(report['output_bytes'])} in {report['num_shards']} shard(s), dtype {report['output_dtype']}")
    print("dry run: nothing written" if report["dry_run"] else f"wrote {report['out']}")
    return 0
