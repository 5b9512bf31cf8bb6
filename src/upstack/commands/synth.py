"""`upstack synth-data` (the demo's synthetic task world) and `upstack synth-math` (Synth. Math-Instruct
and Synth. Math-Alignment, SOLAR section 2.2)."""

from __future__ import annotations

import argparse

from upstack.commands.output import format_table, print_json
from upstack.data.synth_math import SynthMathConfig, run_synth_math
from upstack.data.synthetic import SynthDataConfig, run_synth_data

ORDER = 70

SYNTH_DATA_HELP = """\
Write the demo's synthetic task world: a seeded, generated corpus, instruction sets, preference pairs
and held-out evaluation sets in the real benchmarks' formats (same seed, same bytes).

files:
  pretrain.jsonl                 {"text"}: short documents stating facts about invented people, and arithmetic
  sft_math.jsonl, sft_facts.jsonl {"messages": [user, assistant]}: word problems (answers end '#### n'),
                                 questions about the facts
  dpo_math.jsonl                 {"prompt", "chosen", "rejected", "kind"}: a correct worked answer vs a wrong one;
                                 kind: final_line (careless last line), slip (one step's result
                                 off), operation (one step with the wrong operation)
  eval/gsm8k/test.jsonl          {"question", "answer"}          (held out: other names and numbers)
  eval/arc_challenge/test.jsonl  ARC schema, 4 choices            (facts of people never asked about in training)
  eval/dpo_heldout.jsonl         held-out preference pairs (with "kind")
  eval/preference/test.jsonl     the held-out pairs as a two-choice ARC-format task
  eval/math_heldout.jsonl        held-out worked answers as text, for perplexity
  eval/heldout.txt               held-out text for perplexity, one document a line
  manifest.json                  seed, scale, row counts, sha256, vocabulary, disjointness check
  tokenizer/                     with --tokenizer-vocab N: a byte-level BPE trained on the training files

examples:
  upstack synth-data data/world --scale quick
  upstack synth-data data/world --seed 1 --tokenizer-vocab 1024 --json
"""

SYNTH_MATH_HELP = """\
Rephrase seed math questions and answers with a generator model, keep a pair only if the rephrased
answer has the same final answer as the original, and write (SOLAR section 2.2):
  instruct.jsonl   {"messages": [user: rephrased question, assistant: rephrased answer]}  (Synth. Math-Instruct)
  alignment.jsonl  {"prompt": rephrased question, "chosen": rephrased answer,
                    "rejected": original answer}                                      (Synth. Math-Alignment)
  stats.json       read, generated, kept, dropped_* counts;   dropped.jsonl  each drop and its reason

Seed formats (--format, default: detected from the first row's fields):
  metamath  {"query", "response"}   final answer: "The answer is: n"
  gsm8k     {"question", "answer"}  final answer: "#### n"
  math      {"problem", "solution"} final answer: \\boxed{n}
Prompts: rephrase_question.txt and rephrase_answer.txt (placeholders {question}, {answer},
{final_answer_instruction}); the package's, or your own with --prompts DIR.

examples:
  upstack synth-math --seed-data gsm8k/train.jsonl --model Qwen/Qwen2.5-7B-Instruct --out synth-math
  upstack synth-math --seed-data math.jsonl --format math --model ./gen --out out --backend vllm --limit 1000
"""


def register(sub, common) -> None:
    p = sub.add_parser("synth-data", parents=[common], help="write the demo's synthetic task world (seeded)",
                       description=SYNTH_DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--scale", choices=["quick", "default"], default="default",
                   help="quick: the 2-minute demo; default: the 10-minute demo (default)")
    p.add_argument("--tokenizer-vocab", type=int, default=None, metavar="N",
                   help="also train a byte-level BPE tokenizer of N tokens into OUT/tokenizer")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run_synth_data_cmd)

    p = sub.add_parser("synth-math", parents=[common], help="Synth. Math-Instruct / -Alignment by rephrasing",
                       description=SYNTH_MATH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed-data", required=True, metavar="FILE", help="seed rows (.jsonl, or .json array)")
    p.add_argument("--model", required=True, help="generator model (HF folder or hub id)")
    p.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    p.add_argument("--format", choices=["auto", "metamath", "gsm8k", "math"], default="auto",
                   help="seed format (default: detect from fields)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N seed rows")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="prompts per generate call (default 8; 256 with vllm)")
    p.add_argument("--max-new-tokens", type=int, default=512, metavar="T", help="default 512")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 = seeded sampling")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when --temperature > 0")
    p.add_argument("--backend", choices=["transformers", "vllm"], default="transformers")
    p.add_argument("--prompts", default=None, metavar="DIR", help="folder with your own prompt .txt files")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--device", default=None, help="transformers device (default cuda if available, else cpu)")
    p.add_argument("--no-chat-template", action="store_true",
                   help="send the prompts as raw text even if the tokenizer has a chat template")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the stats as JSON")
    p.set_defaults(func=run_synth_math_cmd)


def run_synth_data_cmd(args) -> int:
    cfg = SynthDataConfig(out=args.out, seed=args.seed, scale=args.scale,
                          tokenizer_vocab_size=args.tokenizer_vocab, overwrite=args.overwrite)
    manifest = run_synth_data(cfg)
    if args.json:
        print_json(manifest)
    elif not args.quiet:
        rows = [[name, f["rows"]] for name, f in manifest["files"].items()]
        print(format_table(["file", "rows"], rows))
        print(f"held-out sets disjoint from training: {manifest['disjointness']['passed']}")
        print(f"wrote {args.out}")
    return 0


def run_synth_math_cmd(args) -> int:
    cfg = SynthMathConfig(
        seed_data=args.seed_data, model=args.model, out=args.out, format=args.format, limit=args.limit,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, backend=args.backend, prompts=args.prompts, seed=args.seed, dtype=args.dtype,
        device=args.device, chat_template=not args.no_chat_template, overwrite=args.overwrite,
        quiet=args.quiet)
    stats = run_synth_math(cfg)
    if args.json:
        print_json({k: v for k, v in stats.items() if k != "prompts"})
    elif not args.quiet:
        keys = ["read", "dropped_seed_unparseable", "generated", "dropped_empty_question", "dropped_unparseable",
                "dropped_answer_mismatch", "kept"]
        print(format_table(["count", "rows"], [[k, stats[k]] for k in keys]))
        print(f"wrote {args.out}")
    return 0
