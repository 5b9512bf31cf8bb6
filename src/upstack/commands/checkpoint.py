"""`upstack upscale`, `upstack import`, `upstack inspect`, `upstack verify`."""

from __future__ import annotations

import argparse
import sys

from upstack.arch import ARCHS, format_layer_ranges, layer_runs
from upstack.checkpoint import inspect_checkpoint, read_config, verify_checkpoint
from upstack.commands.output import (
    add_writer_flags,
    format_table,
    human_bytes,
    print_json,
)
from upstack.commands.seam import format_seam_result
from upstack.upscale import UpscaleConfig, upscale

ORDER = 10

UPSCALE_HELP = """\
Depth up-scale a Hugging Face checkpoint (SOLAR's DUS and other layer plans).

Layer plans:
  --method dus --m M        (default) layers [0, n-M) of one copy + [M, n) of another: 2(n-M) layers.
                            SOLAR: Mistral-7B n=32, M=8 -> 48 layers. Default M = n // 4.
  --method stack            the whole model twice (M = 0).
  --method interleave --every K
                            LLaMA-Pro: after every K blocks a copy of the last one with its attention
                            output and MLP down projections zeroed (same function as the source).
  --layers "0-23,8-31"      any list of source-layer ranges; END-INCLUSIVE ("0-23" is 24 layers).

Where the duplicated block goes (dus):
  --seam solar              (default) SOLAR's cut: the block [M, n-M) twice.
  --seam auto --calibration TEXT
                            the placement of the same depth (block start j = 0..n-k, layers
                            [0, j+k) + [j, n)) with the lowest angular distance at the seam, measured
                            by running the base over TEXT (see `upstack seam --help`); or with
                            --seam-score perplexity --perplexity HELDOUT, the lowest step-0 held-out
                            perplexity. The table and the choice go into upstack.json.

Pure copies keep the source bytes exactly (kernel-side byte-range copy; torch is not imported).
The output is a standard HF folder: sharded safetensors + index, config.json with num_hidden_layers
and per-layer fields remapped, tokenizer, chat template, generation config, README.md model card and
upstack.json (the layer map). It is written to a temporary sibling folder and renamed at the end.

examples:
  upstack upscale mistral-7b solar-base --m 8
  upstack upscale ./mistral-config-only out --m 8 --dry-run --json
  upstack upscale tiny tiny-pro --method interleave --every 2
  upstack upscale smollm2 smollm2-44 --m 8 --seam auto --calibration wiki.txt
"""


IMPORT_HELP = """\
Import a GGUF file (llama.cpp's format, usually quantized) as a plain Hugging Face folder.

transformers reads the file: its config, its tokenizer and chat template, and every tensor dequantized
from the file's quantization type (Q4_1, Q8_0, Q4_K, ...) into --dtype (default bfloat16). upstack writes
them as sharded safetensors + index through the same writer as every other output (a temporary folder,
renamed when complete), with config.json, the tokenizer files, generation_config.json, README.md and
upstack.json. Both record the quantization the weights were dequantized from: they are the quantized
model's values, not the original weights. Tied embeddings stay tied (no lm_head is written when the
GGUF has none).

Checked before any tensor is read (one line, exit 2): a truncated or corrupt file, an architecture
transformers cannot map, a quantization type it cannot dequantize. Needs the gguf package
(pip install upstack[gguf]).

examples:
  upstack import SmolLM2-135M-Instruct.Q4_1.gguf smollm2
  upstack import model.Q4_K_M.gguf model-f32 --dtype float32 --shard-size 2GB
  upstack import model.gguf out --dry-run --json        (the header only: architecture, types, size)
"""


def register(sub, common) -> None:
    p = sub.add_parser("upscale", parents=[common], help="depth up-scale a checkpoint (DUS, stack, interleave)",
                       description=UPSCALE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="source HF checkpoint folder (a folder with only config.json works with --dry-run)")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--method", default="dus", choices=["dus", "stack", "interleave"], help="layer plan (default dus)")
    p.add_argument("--m", type=int, default=None, help="dus: layers dropped at the seam from each copy (default n//4)")
    p.add_argument("--layers", default=None,
                   help='explicit source-layer ranges, end-inclusive, e.g. "0-23,8-31" (overrides --method)')
    p.add_argument("--every", type=int, default=None, help="interleave: insert a zeroed copy after every K blocks")
    p.add_argument("--dtype", default=None, help="cast floating tensors (float32, bfloat16, float16); default keeps source")
    add_writer_flags(p, dry_run="print the plan (layer map, config changes, size) and write nothing")
    g = p.add_argument_group("seam (dus)")
    g.add_argument("--seam", default="solar", choices=["solar", "auto"],
                   help="solar (default): the block [m, n-m) twice; auto: the placement with the lowest seam score")
    g.add_argument("--seam-score", default="angle", choices=["angle", "perplexity"],
                   help="auto: angle (default, angular distance at the seam) or perplexity (needs --perplexity)")
    g.add_argument("--calibration", default=None, metavar="TEXT", help="auto: text (data spec) the seam is measured on")
    g.add_argument("--perplexity", default=None, metavar="HELDOUT",
                   help="auto: held-out text; step-0 perplexity of every placement (recorded; needed to choose by it)")
    g.add_argument("--seam-batch-size", type=int, default=4, help="auto: rows per forward pass (default 4)")
    g.add_argument("--seam-max-length", type=int, default=256, help="auto: tokens per row (default 256)")
    g.add_argument("--seam-batches", type=int, default=8, help="auto: at most this many batches per text (default 8)")
    g.add_argument("--seam-device", default=None, help="auto: device of the analysis (default: cuda when available)")
    g.add_argument("--seam-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: dtype the base is loaded in for the analysis (default: the checkpoint's)")
    p.add_argument("--allow-unknown-arch", action="store_true",
                   help="try the generic 'model.layers.N.' pattern for an architecture not in the table (warns)")
    p.set_defaults(func=run_upscale)

    p = sub.add_parser("import", parents=[common], help="import a GGUF file as a Hugging Face folder (dequantized)",
                       description=IMPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a .gguf file")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", help="float32, bfloat16 (default) or float16")
    p.add_argument("--shard-size", default="5GB", help="max shard size with units: 5GB (default), 500MB, 2GiB")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only after the new one is complete)")
    p.add_argument("--dry-run", action="store_true", help="read and check the header only; write nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_import)

    p = sub.add_parser("inspect", parents=[common], help="show a checkpoint's architecture, sizes and dtypes",
                       description="Show architecture, layer count, hidden size, parameters, dtypes, bytes on "
                                   "disk, tied embeddings and per-layer config fields of a checkpoint folder.\n\n"
                                   "example: upstack inspect runs/tiny-solar/upscale --json",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="HF checkpoint folder")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only=True)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=run_inspect)

    p = sub.add_parser("verify", parents=[common], help="check a checkpoint folder is complete and consistent",
                       description="Check index vs shards, strict safetensors headers (offsets, dtypes, sizes), "
                                   "index total_size, layer count and tensor shapes vs config.json, and scan every "
                                   "floating tensor for NaN/inf (chunked: bounded memory); with --load, "
                                   "load it with transformers and run one forward pass. Exit 0 when it passes, "
                                   "2 when problems are found.\n\nexample: upstack verify out --load",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="HF checkpoint folder")
    p.add_argument("--load", action="store_true", help="also load with AutoModelForCausalLM and run a forward pass")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only=True)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_verify)


def run_upscale(args) -> int:
    cfg = UpscaleConfig(
        source=args.source, out=args.out, method=args.method, m=args.m, layers=args.layers, every=args.every,
        dtype=args.dtype, shard_size=args.shard_size, overwrite=args.overwrite, dry_run=args.dry_run,
        allow_unknown_arch=args.allow_unknown_arch, allow_pickle=args.allow_pickle, quiet=args.quiet,
        seam=args.seam, seam_score=args.seam_score, calibration=args.calibration, perplexity=args.perplexity,
        seam_batch_size=args.seam_batch_size, seam_max_length=args.seam_max_length, seam_batches=args.seam_batches,
        seam_device=args.seam_device, seam_dtype=args.seam_dtype,
    )
    if args.allow_unknown_arch:
        src_cfg = read_config(args.source)
        if src_cfg.get("model_type") not in ARCHS:
            print(f"warning: model_type {src_cfg.get('model_type')!r} is not in the architecture table; using "
                  "the generic 'model.layers.N.' pattern; check the output with `upstack verify --load`",
                  file=sys.stderr)
    report = upscale(cfg)
    if args.json:
        print_json(report)
        return 0
    if report.get("seam"):
        print(format_seam_result(report["seam"]) + "\n")
    print(f"{report['description']}: {report['source_num_hidden_layers']} -> {report['num_hidden_layers']} layers "
          f"({report['model_type']})")
    rows = [[f"{a}-{b}", f"{sa}-{sb}"] if b > a else [str(a), str(sa)]
            for a, b, sa, sb in layer_runs(report["layer_map"])]
    print(format_table(["output layers", "<- source layers"], rows))
    if report["new_layers"]:
        print(f"zero-initialised (identity) blocks: {format_layer_ranges(report['new_layers'])}")
    for key, ch in report["config_changes"].items():
        print(f"config {key}: {_short(ch['from'])} -> {_short(ch['to'])}")
    for note in report["notes"]:
        print(f"note: {note}")
    print(f"parameters: {report['source_parameters']:,} -> {report['num_parameters']:,}; "
          f"output {human_bytes(report['output_bytes'])} in {report['num_shards']} shard(s)")
    print("dry run: nothing written" if report["dry_run"] else f"wrote {report['out']}")
    return 0


def run_import(args) -> int:
    from upstack.gguf import ImportConfig, import_gguf

    report = import_gguf(ImportConfig(source=args.source, out=args.out, dtype=args.dtype, shard_size=args.shard_size,
                                      overwrite=args.overwrite, dry_run=args.dry_run, quiet=args.quiet))
    if args.json:
        print_json(report)
        return 0
    types = ", ".join(f"{t} x{n}" for t, n in report["tensor_types"].items())
    print(f"{report['source']}: {report['architecture']}, quantization {report['quantization']} ({types})")
    print(f"parameters: {report['num_parameters']:,}; output {human_bytes(report['output_bytes'])} as {report['dtype']}"
          + (f"; tied: {', '.join(report['tied'])} (not written)" if report.get("tied") else ""))
    print("dry run: nothing written" if report["dry_run"] else
          f"wrote {report['out']} (weights dequantized from {report['quantization']}: not the original weights)")
    return 0


def _short(v) -> str:
    s = str(v)
    return s if len(s) <= 80 else s[:77] + "..."


def run_inspect(args) -> int:
    info = inspect_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
    if args.json:
        print_json(info)
        return 0
    rows = [
        ["architecture", f"{info['model_type']} {info['architectures'] or ''}".strip()
         + ("" if info["supported"] else " (not in upstack's table)")],
        ["layers", info["num_hidden_layers"]],
        ["hidden size", info["hidden_size"]],
        ["intermediate size", info["intermediate_size"]],
        ["heads (kv)", f"{info['num_attention_heads']} ({info['num_key_value_heads']})"],
        ["vocab size", info["vocab_size"]],
        ["parameters", f"{info['num_parameters']:,}"],
        ["dtypes", ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()) or "-"],
        ["config dtype", info["config_dtype"]],
        ["tensor bytes", human_bytes(info["tensor_bytes"])],
        ["bytes on disk", human_bytes(info["bytes_on_disk"])],
        ["tensors / files", f"{info['num_tensors']} in {len(info['weight_files'])} file(s)"],
        ["tied embeddings", f"{info['tie_word_embeddings']} (lm_head stored: {info['has_lm_head']})"],
    ]
    for k, v in info["per_layer_fields"].items():
        rows.append([f"per-layer {k}", _short(v)])
    if info["upstack"] and "upscale" in info["upstack"]:
        up = info["upstack"]["upscale"]
        rows.append(["upscaled from", f"{up.get('source')} ({up.get('method')})"])
    if info["upstack"] and "import" in info["upstack"]:
        imp = info["upstack"]["import"]
        how = "dequantized: not the original weights" if imp.get("dequantized") else "unquantized"
        rows.append(["imported from", f"{imp.get('source')} (GGUF {imp.get('quantization')}, {how})"])
    print(format_table(["field", "value"], rows))
    return 0


def run_verify(args) -> int:
    report = verify_checkpoint(args.checkpoint, load=args.load, allow_pickle=args.allow_pickle)
    if args.json:
        print_json(report)
    else:
        for c in report["checks"]:
            print(f"ok: {c}")
        for w in report["warnings"]:
            print(f"warning: {w}")
        for p in report["problems"]:
            print(f"problem: {p}")
        print("verify: PASSED" if report["ok"] else f"verify: FAILED ({len(report['problems'])} problem(s))")
    return 0 if report["ok"] else 2
