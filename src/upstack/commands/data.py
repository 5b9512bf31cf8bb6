"""`upstack data SPEC...`: check data specs as a training stage would read them (docs/data.md)."""

from __future__ import annotations

import argparse

from upstack.commands.output import print_json

ORDER = 15

HELP = """\
Check data specs without training: read them exactly as `upstack sft`, `dpo` or `pretrain` would (the
same loaders, with bad rows counted instead of stopping) and report, per source, the format detected,
the fields the rows carry, the rows read, what would be dropped and why (the filter, each kind of
malformed row, samples=/weight=), the rows used, and the first row as the stage reads it. A problem
that would stop training (a missing file, an unknown format, no usable rows) is one `error:` line,
exit 2. SPEC is PATH[:format=...,split=...,samples=N,weight=W,seed=S,filter=...] (docs/data.md).

examples:
  upstack data data/alpaca.jsonl
  upstack data data/hh.jsonl:format=hh_rlhf --for dpo --json
  upstack data a.jsonl:weight=2 b.jsonl:weight=1 --seed 1
  upstack data corpus.txt --for pretrain
"""


def register(sub, common) -> None:
    p = sub.add_parser("data", parents=[common], help="check data specs: rows, format, fields, what is dropped",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("specs", nargs="+", metavar="SPEC", help="data sources, as --data of the training commands")
    p.add_argument("--for", dest="stage", choices=["sft", "dpo", "pretrain"], default=None,
                   help="read the data as this stage does (default: from format=, or the first row's keys; "
                        "a row that is a preference pair counts as DPO data, .txt files as pretraining text)")
    p.add_argument("--seed", type=int, default=0, help="the mixture's seed, as --seed of the stage (default 0)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_data)


def run_data(args) -> int:
    from upstack.data.check import check_data, data_stage_kind, format_check

    result = check_data(args.specs, kind=data_stage_kind(args.stage), seed=args.seed)
    if args.json:
        print_json(result)
    else:
        print(format_check(result))
    return 0
