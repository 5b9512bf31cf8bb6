"""`upstack eval`, `upstack contamination`, `upstack decontaminate`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from upstack.commands.output import print_json
from upstack.data.decontaminate import DecontaminateConfig, decontaminate
from upstack.data.decontaminate import format_report as decontaminate_report
from upstack.data.spec import split_named
from upstack.errors import ConfigError
from upstack.evaluate.contamination import ContaminationConfig, contamination
from upstack.evaluate.contamination import format_report as contamination_report
from upstack.evaluate.harness import (
    EvalConfig,
    compare,
    compare_table,
    evaluate,
    markdown_table,
)

ORDER = 50

EVAL_HELP = """\
Score a checkpoint with lm-evaluation-harness (its Python API and HF model class).

Tasks (--tasks, comma-separated or repeated):
  h6                 the Open LLM Leaderboard v1 six: arc_challenge 25-shot acc_norm, hellaswag 10-shot
                     acc_norm, mmlu 5-shot acc, truthfulqa_mc2 0-shot, winogrande 5-shot acc, gsm8k 5-shot
                     exact match (strict "#### n"); H6 = their plain mean. With --data-dir or --task-file
                     it means the local versions (h6_local).
  arc_challenge ...  the real lm-eval tasks (data from the Hugging Face Hub or its cache); any lm-eval
                     task name works.
  *_local            the same tasks over local files in the benchmarks' own formats:
                     arc_challenge_local, hellaswag_local, mmlu_local, truthfulqa_mc2_local,
                     winogrande_local, gsm8k_local. --data-dir DIR holds arc_challenge/, hellaswag/,
                     mmlu/, truthfulqa/, winogrande/, gsm8k/ (like ../shared/data); --task-file
                     TASK=PATH names one file (or an MMLU folder) instead.

Preference accuracy (--preference FILE, repeatable): held-out (prompt, chosen, rejected) pairs in any
format `upstack dpo` reads, rendered with the model's chat template as DPO renders them; reports the
share of pairs whose chosen answer has the higher summed log-prob (accuracy; accuracy_per_token with
per-token means), the mean log-prob margin, and with --preference-reference MODEL (e.g. the SFT model
a DPO model started from) the DPO implicit-reward accuracy and margin; --preference-group FIELD breaks
the metrics down by a field of the rows (the demo's pairs have `kind`: the kind of wrong answer).

Results: a markdown table on stdout (--json: the results JSON); --output FILE writes the JSON and
FILE.md (an existing FILE needs --overwrite); --log-samples also writes each task's per-document
records beside it (samples_<task>_<time>.jsonl, as lm-eval --log_samples). --compare A.json B.json ...
prints several results side by side.

examples:
  upstack eval runs/tiny/merge --tasks h6 --data-dir ../shared/data --limit 20 --output runs/tiny/eval.json
  upstack eval runs/tiny/sft --tasks gsm8k_local,arc_challenge_local --task-file gsm8k_local=heldout.jsonl \\
      --task-file arc_challenge_local=arc_heldout.jsonl --perplexity heldout.txt
  upstack eval runs/tiny/dpo --preference pairs_heldout.jsonl --preference-reference runs/tiny/sft \\
      --preference-group kind
  upstack eval upstage/SOLAR-10.7B-v1.0 --tasks h6 --batch-size auto --output solar.json
  accelerate launch -m upstack.cli eval solar-out --tasks h6 --output h6.json    (data parallel)
  upstack eval solar-out --tasks h6 --backend vllm --model-args tensor_parallel_size=2
  upstack eval --compare base.json sft.json dpo.json merged.json
"""

CONTAMINATION_HELP = """\
The data-contamination test SOLAR reports. For N sampled examples (question + gold answer), the
reference model writes K neighbours by sampling a continuation of the first 40% of the words; an
example's score is the share of neighbours the model finds easier (lower mean NLL) than the example
itself. result = share of examples with score < 0.1: below 0.1 no sign of contamination, above 0.9
likely contaminated. --method min-k gives Min-K% Prob scores instead (Shi et al. 2023).

Benchmarks: files in the benchmarks' own formats (ARC/HellaSwag/Winogrande/GSM8K JSONL, TruthfulQA
mc_task JSON, MMLU CSVs or a folder of them), or any JSONL (`text` or all string fields) or text file
(one example per line). Name them with NAME=PATH.

examples:
  upstack contamination solar-instruct --reference solar-base --benchmark gsm8k=gsm8k/test.jsonl \\
      --benchmark arc=ARC-Challenge-Test.jsonl --output contamination.json
  upstack contamination runs/tiny/sft --reference runs/tiny/upscale --benchmark heldout.jsonl \\
      --num-examples 20 --num-neighbours 20
  upstack contamination runs/tiny/sft --method min-k --benchmark heldout.jsonl
"""

DECONTAMINATE_HELP = """\
Remove training rows that share a long n-gram (default 13 words; lowercased, punctuation removed)
with any benchmark example. The benchmarks' n-gram hashes are held in memory; the training JSONL is
streamed, so it can be any size. Kept rows go to --out unchanged; removed rows go to a side file
(default OUT with .removed.jsonl) with the benchmarks they matched. Reports rows removed per benchmark.

examples:
  upstack decontaminate sft.jsonl --against ../shared/data/gsm8k ../shared/data/arc_challenge --out sft.clean.jsonl
  upstack decontaminate chat.jsonl --against mmlu=../shared/data/mmlu --fields messages --out chat.clean.jsonl
"""


def _pairs(items: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        named = split_named(item)
        if named is None or not named[1]:
            raise ConfigError(f"{flag} {item!r}: expected TASK=PATH")
        out[named[0].strip()] = named[1].strip()
    return out


def _scalar(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _model_args(text: str | None) -> dict:
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--model-args {text!r}: expected key=value,key=value")
        out[key.strip()] = _scalar(value.strip())
    return out


def _limit(text: str | None):
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--limit {text!r}: expected a number of documents (or a fraction below 1)") from None
    return int(value) if value >= 1 else value


def _batch(text: str):
    return int(text) if text.isdigit() else text


def register(sub, common) -> None:
    p = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint (H6 benchmarks, local tasks, perplexity)",
                       description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="HF checkpoint folder (or Hub id when online)")
    p.add_argument("--tasks", action="append", help="task names, comma-separated (h6, *_local, any lm-eval task)")
    p.add_argument("--data-dir", help="folder with the benchmarks' files (like ../shared/data): use the local tasks")
    p.add_argument("--task-file", action="append", metavar="TASK=PATH",
                   help="file to score for a local task (MMLU: a CSV or a folder); repeatable")
    p.add_argument("--fewshot-file", action="append", metavar="TASK=PATH",
                   help="few-shot examples for a local task (default: a train file beside it, else the scored "
                        "file without the scored document)")
    p.add_argument("--num-fewshot", action="append", metavar="N|TASK=N",
                   help="few-shot count for all tasks, or per task (repeatable); default: the leaderboard's")
    p.add_argument("--limit", help="documents per task (a fraction if below 1); for quick checks")
    p.add_argument("--batch-size", default="8", help="batch size or 'auto' (default 8)")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf", help="lm-eval model class (default hf)")
    p.add_argument("--model-args", help="extra backend arguments: key=value,... (e.g. tensor_parallel_size=2); "
                                         "settings that name no file, and peft=DIR, delta=DIR, tokenizer=DIR, "
                                         "which pass the checkpoint gate; other keys are refused")
    p.add_argument("--dtype", default="auto", help="auto (checkpoint dtype), bfloat16, float16, float32")
    p.add_argument("--max-length", type=int, help="context length (default: the model's); longer prompts are "
                                                  "truncated from the left")
    p.add_argument("--max-gen-toks", type=int, help="generation budget for generative tasks (default 256, less "
                                                    "for short-context models)")
    p.add_argument("--apply-chat-template", action="store_true", help="format prompts with the tokenizer's chat template")
    p.add_argument("--seed", type=int, default=1234, help="seed for few-shot sampling and generation (default 1234)")
    p.add_argument("--perplexity", action="append", metavar="FILE", help="text file or JSONL to score (repeatable)")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text for --perplexity (default text)")
    p.add_argument("--stride", type=int, help="perplexity sliding-window stride in tokens (default: half the window)")
    p.add_argument("--perplexity-max-tokens", type=int, metavar="N",
                   help="score only the first N tokens of each --perplexity file (a fixed slice of a long text)")
    p.add_argument("--preference", action="append", metavar="FILE",
                   help="preference pairs to score: chosen vs rejected log-prob accuracy (repeatable)")
    p.add_argument("--preference-reference", metavar="MODEL",
                   help="reference model for --preference: adds DPO implicit-reward accuracy and margin")
    p.add_argument("--preference-group", metavar="FIELD",
                   help="also report --preference metrics per value of this field of each row (e.g. kind)")
    p.add_argument("--template", choices=["auto", "chat", "alpaca"], default="auto",
                   help="how --preference renders pairs: the tokenizer's chat template (chat), the SOLAR "
                        "'### User:' format (alpaca), or chat when the tokenizer has one (auto, default)")
    p.add_argument("--sample", action="append", metavar="PROMPT",
                   help="a prompt whose greedy reply goes into the results (chat template when the tokenizer has "
                        "one; repeatable); a recipe's eval entry lists them as samples:")
    p.add_argument("--sample-max-new-tokens", type=int, default=64,
                   help="longest reply to a --sample prompt, in tokens (default 64)")
    p.add_argument("--output", "-o", help="write results JSON here (and a markdown table next to it, .md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--log-samples", action="store_true",
                   help="with --output: also write each task's per-document records (prompt, target, responses, "
                        "log-likelihoods or generated text, metrics) beside it, as samples_<task>_<time>.jsonl")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .bin weights (loaded with torch.load(weights_only=True))")
    p.add_argument("--compare", nargs="+", metavar="RESULTS", help="print results files side by side")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("contamination", parents=[common], help="data-contamination test against a reference model",
                       description=CONTAMINATION_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="the model under test (HF checkpoint folder)")
    p.add_argument("--reference", help="the model it was trained from, e.g. its base (required by the neighbour test)")
    p.add_argument("--benchmark", action="extend", nargs="+", required=True, metavar="[NAME=]PATH",
                   help="benchmark file or folder (repeatable)")
    p.add_argument("--method", choices=["neighbours", "min-k"], default="neighbours")
    p.add_argument("--num-examples", type=int, default=100, help="examples sampled per benchmark (default 100)")
    p.add_argument("--num-neighbours", type=int, default=100, help="neighbours per example (default 100)")
    p.add_argument("--prefix-fraction", type=float, default=0.4, help="share of words neighbours keep (default 0.4)")
    p.add_argument("--threshold", type=float, default=0.1, help="score below which an example counts (default 0.1)")
    p.add_argument("--min-k-percent", type=float, default=20.0, help="Min-K%%: share of least likely tokens (default 20)")
    p.add_argument("--temperature", type=float, default=1.0, help="neighbour sampling temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=50, help="neighbour sampling top-k, 0 for none (default 50)")
    p.add_argument("--max-length", type=int, help="tokens per text (default: the model's context)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--output", "-o", help="write the results JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .bin weights (loaded with torch.load(weights_only=True))")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run_contamination)

    p = sub.add_parser("decontaminate", parents=[common], help="drop training rows that overlap benchmark examples",
                       description=DECONTAMINATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="training JSONL")
    p.add_argument("--against", action="extend", nargs="+", required=True, metavar="[NAME=]BENCH",
                   help="benchmark files or folders")
    p.add_argument("--out", "-o", required=True, help="where to write the kept rows (JSONL)")
    p.add_argument("--removed", help="where to write the removed rows (default: OUT with .removed.jsonl)")
    p.add_argument("--ngram", type=int, default=13, help="n-gram length in words (default 13)")
    p.add_argument("--fields", help="comma-separated top-level fields to check (default: every string in the row)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run_decontaminate)


def _quiet_harness(debug: bool) -> None:
    """lm-eval logs every task it builds at INFO; keep its warnings unless --debug."""
    if not debug:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)


def run_eval(args) -> int:
    if args.compare:
        if args.model or args.tasks or args.perplexity or args.preference:
            raise ConfigError("--compare takes only results files (no MODEL, --tasks, --perplexity or --preference)")
        cmp = compare(args.compare)
        print_json(cmp) if args.json else sys.stdout.write(compare_table(cmp))
        return 0
    if not args.model:
        raise ConfigError("give MODEL (a checkpoint folder), or --compare RESULTS.json ...")
    shots, task_shots = None, {}
    for item in args.num_fewshot or []:
        key, sep, value = item.rpartition("=")
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"--num-fewshot {item!r}: expected N or TASK=N") from None
        if sep:
            task_shots[key] = n
        else:
            shots = n
    cfg = EvalConfig(
        model=args.model, tasks=args.tasks or [], data_dir=args.data_dir,
        task_files=_pairs(args.task_file, "--task-file"), fewshot_files=_pairs(args.fewshot_file, "--fewshot-file"),
        num_fewshot=shots, task_fewshot=task_shots, limit=_limit(args.limit), batch_size=_batch(args.batch_size),
        device=args.device, backend=args.backend, model_args=_model_args(args.model_args), dtype=args.dtype,
        max_length=args.max_length, max_gen_toks=args.max_gen_toks, apply_chat_template=args.apply_chat_template,
        seed=args.seed, perplexity=args.perplexity or [], text_field=args.text_field, stride=args.stride,
        perplexity_max_tokens=args.perplexity_max_tokens,
        preference=args.preference or [], preference_reference=args.preference_reference,
        preference_group=args.preference_group, template=args.template, samples=args.sample or [],
        sample_max_new_tokens=args.sample_max_new_tokens,
        output=args.output, overwrite=args.overwrite, log_samples=args.log_samples, quiet=args.quiet,
        allow_pickle=args.allow_pickle,
    )
    _quiet_harness(args.debug)
    out = evaluate(cfg)
    if not out:  # a non-main process under accelerate launch
        return 0
    if args.json:
        print_json(out)
    else:
        sys.stdout.write(markdown_table(out))
    if args.output:
        logging.getLogger(__name__).info("wrote %s and %s", args.output, Path(args.output).with_suffix(".md"))
    return 0


def run_contamination(args) -> int:
    cfg = ContaminationConfig(
        model=args.model, reference=args.reference, benchmarks=args.benchmark, method=args.method,
        num_examples=args.num_examples, num_neighbours=args.num_neighbours, prefix_fraction=args.prefix_fraction,
        threshold=args.threshold, min_k_percent=args.min_k_percent, temperature=args.temperature, top_k=args.top_k,
        max_length=args.max_length, batch_size=args.batch_size, seed=args.seed, device=args.device,
        dtype=args.dtype, output=args.output, overwrite=args.overwrite, allow_pickle=args.allow_pickle,
    )
    out = contamination(cfg)
    if args.json:
        print_json(out)
    else:
        print(contamination_report(out))
    return 0


def run_decontaminate(args) -> int:
    cfg = DecontaminateConfig(
        data=args.data, against=args.against, out=args.out, removed=args.removed, ngram=args.ngram,
        fields=[f.strip() for f in args.fields.split(",") if f.strip()] if args.fields else [],
        overwrite=args.overwrite,
    )
    report = decontaminate(cfg)
    if args.json:
        print_json(report)
    else:
        print(decontaminate_report(report))
    return 0
