"""`upstack seam`: score every placement of the duplicated block of a depth up-scaling."""

from __future__ import annotations

import argparse

from upstack.commands.output import format_table, print_json
from upstack.seam import SCORES, SeamOptions, analyse_seams, plot_seams

ORDER = 11

SEAM_HELP = """\
Score every placement of the duplicated block of a depth up-scaling, before writing anything.

An n-layer base up-scaled to n + k layers repeats a k-layer block starting at layer j: layers
[0, j+k) + [j, n), j = 0..n-k. SOLAR's cut (--m M: depth 2(n-M), k = n - 2M) is j = M. For each
placement, from one pass of the base over --calibration:

  angular distance  mean over tokens of arccos(cos(h_j, h_(j+k))) / pi, where h_i is the hidden state
                    entering layer i (transformers' output_hidden_states[i]; h_n is the last layer's
                    output before the final norm). Layer j receives h_(j+k) at the seam instead of h_j.
  perplexity        with --perplexity HELDOUT: the step-0 held-out perplexity of the up-scaled model,
                    run from the base's own layers in the placement's order (nothing is written).

and for each base layer i its block influence (ShortGPT): 1 - mean cos(h_i, h_(i+1)).
The table is sorted by --score (lowest first) and marks SOLAR's cut; `upstack upscale --seam auto`
writes the first row. Texts are data specs (PATH[:field=NAME,...], see docs/data.md): their documents
are tokenized, joined with eos and cut into rows of --max-length tokens; at most --batches batches of
--batch-size rows are read from each. Memory: one copy of the base plus one batch's hidden states of
all layers ((n+1) x batch x length x hidden).

examples:
  upstack seam ./SmolLM2-135M --calibration wiki.txt --m 8
  upstack seam ./SmolLM2-135M --calibration wiki.txt --layers 44 --perplexity wiki.test.raw --plot seam.png
"""


def register(sub, common) -> None:
    p = sub.add_parser("seam", parents=[common], help="score every placement of the duplicated block (seam)",
                       description=SEAM_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="base model: HF checkpoint folder (or a Hub id)")
    p.add_argument("--calibration", required=True, metavar="TEXT",
                   help="text the hidden states are measured on (data spec)")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--layers", type=int, default=None, dest="depth", metavar="N",
                       help="depth of the up-scaled model (n+1 .. 2n layers)")
    depth.add_argument("--m", type=int, default=None,
                       help="SOLAR's m: depth 2(n-m) (default n//4, as upscale)")
    p.add_argument("--perplexity", default=None, metavar="HELDOUT",
                   help="held-out text: step-0 perplexity of every placement (one pass of the deeper model each)")
    p.add_argument("--score", default="angle", choices=SCORES,
                   help="sort by (and choose) this column (perplexity needs --perplexity); default angle")
    p.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (default 4)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--batches", type=int, default=8, help="at most this many batches of each text (default 8)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the base is loaded in (default: the checkpoint's)")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot the scores by block start into PNG")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only=True)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_seam)


def run_seam(args) -> int:
    opts = SeamOptions(calibration=args.calibration, perplexity=args.perplexity, score=args.score,
                       batch_size=args.batch_size, max_length=args.max_length, batches=args.batches,
                       device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle, quiet=args.quiet)
    result = analyse_seams(args.model, depth=args.depth, m=args.m, opts=opts)
    if args.plot:
        plot_seams(result, args.plot)
    if args.json:
        print_json(result)
        return 0
    print(format_seam_result(result))
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


def format_seam_result(result: dict) -> str:
    """The placements table (sorted by the score), the block-influence table and the choice, as text."""
    n, k = result["source_num_hidden_layers"], result["block_length"]
    cal = result["calibration"]
    lines = [f"{result['model']}: {n} -> {result['num_hidden_layers']} layers, a duplicated block of {k} layers; "
             f"calibration {cal['rows']} x {cal['max_length']} tokens of {cal['data']}"]
    held = result.get("heldout")
    if held:
        lines.append(f"held-out {held['rows']} x {cal['max_length']} tokens of {held['data']}: base perplexity "
                     f"{held['base_perplexity']:.4g}")
    by_start = {c["start"]: c for c in result["candidates"]}
    rows = []
    for rank, j in enumerate(result["order"], 1):
        c = by_start[j]
        row = [rank, f"{c['block'][0]}-{c['block'][1]}", c["slices"], f"{c['angular_distance']:.4f}"]
        if held:
            row.append(f"{c['perplexity']:.4g}")
        row.append(", ".join(x for x in ("chosen" if rank == 1 else "",
                                         f"SOLAR m={(n - k) // 2}" if c["solar"] else "") if x))
        rows.append(row)
    headers = ["rank", "duplicated block", "--layers", "angular distance"] + (["perplexity"] if held else []) + [""]
    lines += ["", format_table(headers, rows), ""]
    bi = result["block_influence"]
    lines.append(format_table(["layer", "block influence 1-cos(h_i, h_i+1)"],
                              [[b["layer"], f"{b['block_influence']:.4f}"] for b in bi]))
    chosen = result["chosen"]
    lines += ["", f"chosen ({result['score']}): block {chosen['block'][0]}-{chosen['block'][1]}, "
                  f"upstack upscale MODEL OUT --layers {chosen['slices']}"]
    if result["solar"] is None:
        lines.append(f"no SOLAR cut gives {result['num_hidden_layers']} layers (n - k = {n - k} is odd)")
    return "\n".join(lines)
