"""`upstack generate`."""

from __future__ import annotations

import argparse

from upstack.commands.output import print_json

ORDER = 55

GENERATE_HELP = """\
Talk to a model: its replies to prompts, streamed to the terminal as they are generated.

MODEL is any checkpoint upstack reads (a folder, or a Hub id online or in the cache); --adapter DIR
adds a PEFT LoRA adapter on top without merging it (same replies as the merged model, up to float
rounding). Prompts: --prompt TEXT (repeatable) and/or --prompts FILE.jsonl with rows {"prompt": TEXT}
or {"messages": [{"role": "user", "content": TEXT}, ...]} (a bad row is one error naming file and row).
The tokenizer's chat template is applied by default when it has one (a prompt is one user turn);
--no-chat feeds the text as it is.

Decoding: --temperature 0 (default) is greedy; above 0 samples with --top-p, seeded with --seed before
each prompt (same seed, same text). --max-new-tokens bounds each reply. Other settings (top_k,
repetition penalty, EOS tokens) come from the model's generation_config.json.

Output: replies stream to the terminal; --quiet prints each reply when it is complete, --json prints
all rows as JSON at the end; --output FILE.jsonl writes the rows (prompt or messages, reply, new_tokens,
finish_reason "stop" or "length", and the settings), atomically.

examples:
  upstack generate smollm2 --prompt "What is the capital of France?"
  upstack generate runs/tiny-solar/dpo --prompts prompts.jsonl --max-new-tokens 64 --output replies.jsonl
  upstack generate runs/x/sft --prompt "Tell me a story" --temperature 0.8 --top-p 0.9 --seed 1
  upstack generate base --adapter runs/x/sft_lora/adapter --prompt "Hello" --no-chat --json
"""


def register(sub, common) -> None:
    p = sub.add_parser("generate", parents=[common], help="talk to a model: replies to prompts, streamed",
                       description=GENERATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint folder or Hub id")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    p.add_argument("--prompts", metavar="FILE", help='JSONL rows {"prompt": ...} or {"messages": [...]}')
    p.add_argument("--no-chat", dest="chat", action="store_false",
                   help="do not apply the chat template (raw text prompts)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy; > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, set before each prompt (default 0)")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT LoRA adapter folder, applied without merging")
    p.add_argument("--output", metavar="FILE", help="write the replies as JSONL (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16, float16")
    p.add_argument("--allow-pickle", action="store_true", help="read pickled .bin weights (weights_only=True)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON at the end (no streaming)")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    from upstack.evaluate.generate import GenerateConfig, generate, write_stdout

    cfg = GenerateConfig(model=args.model, prompt=args.prompt, prompts=args.prompts, chat=args.chat,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, adapter=args.adapter, output=args.output, overwrite=args.overwrite,
                         device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle)
    rows = generate(cfg, stream_to_terminal=not (args.quiet or args.json))
    if args.json:
        print_json(rows)
    elif args.quiet:
        write_stdout(rows)
    return 0
