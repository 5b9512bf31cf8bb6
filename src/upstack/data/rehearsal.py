"""The paper recipe's inputs at tiny size, offline: what `recipes/solar-10.7b.yaml --profile rehearsal` runs on.

The real recipe reads a hub model (Mistral-7B-v0.1), hub datasets (FineWeb-Edu, Alpaca-GPT4, OpenOrca,
UltraFeedback, Orca DPO pairs), MetaMathQA's MATH seeds, a 7B generator for synth-math and the six H6
benchmarks. The `rehearsal-data` stage writes a stand-in for each, in the same format, from the seeded
synthetic world (`upstack.data.synthetic`), so that every stage and every option of the real recipe runs
end to end on a CPU in minutes:

    base/                   a random model of Mistral-7B-v0.1's config (vocab 32,000, 32 layers, its rope,
                            norms, window) made narrow (hidden 64), bf16 like the real checkpoint, with a
                            byte-level BPE tokenizer trained on the generated text (ids <s>=1 </s>=2 as
                            Mistral's; the model's vocabulary is 32,000 like the real one, the tokenizer
                            uses its first few thousand ids)
    generator/              synth-math's generator: a one-layer model of the same shape wired by hand as a
                            bigram table that answers every prompt with "The answer is: 4" (a random model
                            would fail every check, and synth-math would keep nothing for sft and dpo)
    fineweb-edu/sample-10BT/train.jsonl        FineWeb-Edu rows: text, id, url, score, int_score, ...
    alpaca-gpt4-data/train.jsonl               instruction, input, output
    OpenOrca/train.jsonl                       id (flan., niv., t0., cot.), system_prompt, question, response
    ultrafeedback_binarized_cleaned/train_prefs.jsonl   prompt, prompt_id, chosen/rejected message lists,
                                                         score_chosen, score_rejected
    orca_dpo_pairs/train.jsonl                 system, question, chosen, rejected
    metamath_math.jsonl                        query, response ("The answer is: X"), type (MATH_*),
                                               original_question
    benchmarks/{arc_challenge,hellaswag,mmlu,truthfulqa,winogrande,gsm8k}/   the H6 files in their own
                                               formats (docs/evaluation.md), from the world's held-out facts
                                               and word problems (never in a training file)

Everything comes from `seed`: same seed and options, same files (the tokenizer and models included).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Literal

from upstack.data.synthetic import build_world
from upstack.data.tokenizer import train_tokenizer
from upstack.errors import ConfigError
from upstack.hub import KNOWN_CONFIGS
from upstack.outputs import atomic_output_dir

# Mistral-7B-v0.1's public config.json (upstack.hub.KNOWN_CONFIGS, which the planner uses too).
MISTRAL_7B = KNOWN_CONFIGS["mistralai/Mistral-7B-v0.1"]
LIKE = KNOWN_CONFIGS
GENERATOR_REPLY = "The answer is: 4"   # what the stub generator says to every prompt
OPENORCA_PREFIXES = ("flan", "niv", "t0", "cot")  # the recipe's filter drops flan and niv


@dataclasses.dataclass
class RehearsalDataConfig:
    """A recipe's rehearsal-data stage (see the module docstring)."""

    out: str
    like: Literal["mistralai/Mistral-7B-v0.1"] = "mistralai/Mistral-7B-v0.1"  # whose config the base takes
    num_hidden_layers: int | None = None   # None: the real model's (32: DUS m = 8 gives 48, as the paper)
    hidden_size: int = 64
    intermediate_size: int = 224           # 3.5 x hidden, as Mistral-7B
    num_attention_heads: int = 4           # head_dim 16; 4 query heads per key/value head, as Mistral-7B
    num_key_value_heads: int = 1
    rows: int = 48                         # rows of each training set (OpenOrca: twice, half filtered out)
    seed_rows: int = 8                     # MetaMath MATH seeds for synth-math (half end in the generator's answer)
    benchmark_rows: int = 40               # rows of each benchmark file
    seed: int = 0
    overwrite: bool = False


def check_config(cfg: RehearsalDataConfig) -> None:
    """Value checks (no file is read)."""
    problems = []
    for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rows",
                 "seed_rows", "benchmark_rows"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.num_hidden_layers is not None and cfg.num_hidden_layers < 2:
        problems.append(f"num_hidden_layers: must be >= 2, got {cfg.num_hidden_layers}")
    if cfg.num_attention_heads >= 1 and cfg.hidden_size % cfg.num_attention_heads:
        problems.append(f"hidden_size {cfg.hidden_size} must be a multiple of num_attention_heads "
                        f"{cfg.num_attention_heads}")
    if cfg.num_key_value_heads >= 1 and cfg.num_attention_heads % cfg.num_key_value_heads:
        problems.append(f"num_attention_heads {cfg.num_attention_heads} must be a multiple of num_key_value_heads "
                        f"{cfg.num_key_value_heads}")
    if cfg.benchmark_rows < 27:
        problems.append(f"benchmark_rows: must be >= 27 (ARC is scored 25-shot), got {cfg.benchmark_rows}")
    if problems:
        raise ConfigError("; ".join(problems))


# --------------------------------------------------------------------------------------------------
# Datasets in the real ones' formats
# --------------------------------------------------------------------------------------------------

def _take(rows: list, n: int) -> list:
    return [rows[i % len(rows)] for i in range(n)]


def _user_assistant(row: dict) -> tuple[str, str]:
    return row["messages"][0]["content"], row["messages"][1]["content"]


def training_sets(world: dict, cfg: RehearsalDataConfig, rng: random.Random) -> dict[str, list]:
    n = cfg.rows
    sft = world["sft_facts.jsonl"] + world["sft_math.jsonl"]
    rng.shuffle(sft)
    pairs = list(world["dpo_math.jsonl"])
    rng.shuffle(pairs)
    docs = world["pretrain.jsonl"]
    out: dict[str, list] = {}
    out["fineweb-edu/sample-10BT/train.jsonl"] = [
        {"text": d["text"], "id": f"<urn:uuid:{rng.getrandbits(64):016x}>", "dump": "CC-MAIN-2024-10",
         "url": f"https://example.org/doc/{i}", "language": "en", "language_score": 0.95,
         "token_count": len(d["text"].split()), "score": round(2.5 + rng.random() * 2, 3), "int_score": 3}
        for i, d in enumerate(docs)]
    alpaca = []
    for r in _take(sft, n):
        q, a = _user_assistant(r)
        head, _, rest = q.partition(". ")
        alpaca.append({"instruction": q, "input": "", "output": a} if not rest or rng.random() < 0.5
                      else {"instruction": rest, "input": head + ".", "output": a})
    out["alpaca-gpt4-data/train.jsonl"] = alpaca
    orca = []
    for i, r in enumerate(_take(sft[n:] + sft[:n], 2 * n)):
        q, a = _user_assistant(r)
        orca.append({"id": f"{OPENORCA_PREFIXES[i % len(OPENORCA_PREFIXES)]}.{i}",
                     "system_prompt": "" if i % 3 == 0 else "You are a helpful assistant.",
                     "question": q, "response": a})
    out["OpenOrca/train.jsonl"] = orca
    out["ultrafeedback_binarized_cleaned/train_prefs.jsonl"] = [
        {"prompt": p["prompt"], "prompt_id": f"{rng.getrandbits(64):016x}",
         "chosen": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["rejected"]}],
         "score_chosen": 8.0, "score_rejected": 4.0} for p in _take(pairs, n)]
    out["orca_dpo_pairs/train.jsonl"] = [
        {"system": "" if i % 2 else "You are an AI assistant. Think step by step.", "question": p["prompt"],
         "chosen": p["chosen"], "rejected": p["rejected"]} for i, p in enumerate(_take(pairs[n:] + pairs[:n], n))]
    seeds = []
    for i in range(cfg.seed_rows):
        a = rng.randint(1, 3) if i % 2 == 0 else rng.randint(5, 30)
        b = 4 - a if i % 2 == 0 else rng.randint(1, 30)
        q = f"Compute ${a} + {b}$."
        seeds.append({"query": f"What is the value of ${a} + {b}$?", "original_question": q,
                      "response": f"We add: ${a} + {b} = {a + b}$. The answer is: {a + b}",
                      "type": ("MATH_Rephrased", "MATH_AnsAug", "MATH_FOBAR", "MATH_SV")[i % 4]})
    out["metamath_math.jsonl"] = seeds
    return out


def benchmark_sets(world: dict, cfg: RehearsalDataConfig, rng: random.Random) -> dict[str, list | str]:
    """The H6 benchmark files, from the world's held-out ARC facts and GSM8K word problems."""
    n = cfg.benchmark_rows
    arc = _take(world["eval/arc_challenge/test.jsonl"], n)
    gsm = _take(world["eval/gsm8k/test.jsonl"], n)
    out: dict[str, list | str] = {"benchmarks/arc_challenge/ARC-Challenge-Test.jsonl": arc,
                                  "benchmarks/gsm8k/test.jsonl": gsm}

    def parts(item):
        choices = [c["text"] for c in item["question"]["choices"]]
        return item["question"]["stem"], choices, "ABCD".index(item["answerKey"])

    hella, truth, wino = [], [], []
    mmlu = {"dev": io.StringIO(), "test": io.StringIO()}
    for i, item in enumerate(arc):
        stem, choices, k = parts(item)
        hella.append({"ind": i, "activity_label": "Facts", "ctx_a": stem, "ctx_b": "The answer is",
                      "ctx": stem + " The answer is", "endings": choices, "label": str(k),
                      "source_id": f"rehearsal~{i}", "split": "val", "split_type": "indomain"})
        truth.append({"question": stem,
                      "mc1_targets": {c: int(j == k) for j, c in enumerate(choices)},
                      "mc2_targets": {c: int(j == k) for j, c in enumerate(choices)}})
        other = choices[(k + 1) % len(choices)]
        options = [choices[k], other] if i % 2 == 0 else [other, choices[k]]
        wino.append({"sentence": f"{stem} I think it is _.", "option1": options[0], "option2": options[1],
                     "answer": "1" if i % 2 == 0 else "2"})
        csv.writer(mmlu["dev" if i < 5 else "test"]).writerow([stem, *choices, "ABCD"[k]])
    out["benchmarks/hellaswag/hellaswag_val.jsonl"] = hella
    out["benchmarks/truthfulqa/mc_task.json"] = json.dumps(truth, ensure_ascii=False, indent=1) + "\n"
    out["benchmarks/winogrande/dev.jsonl"] = wino
    out["benchmarks/mmlu/dev/miscellaneous_dev.csv"] = mmlu["dev"].getvalue()
    out["benchmarks/mmlu/test/miscellaneous_test.csv"] = mmlu["test"].getvalue()
    return out


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def base_config(cfg: RehearsalDataConfig) -> dict:
    """The real model's config with the rehearsal's width (and depth, when set)."""
    d = dict(LIKE[cfg.like])
    d.update(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
             num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads)
    if cfg.num_hidden_layers is not None:
        d["num_hidden_layers"] = cfg.num_hidden_layers
    return d


def _save_model(config_dict: dict, tokenizer_dir: Path, out: Path, seed: int, dtype: str, wire=None) -> None:
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    d = dict(config_dict)
    d.pop("architectures", None)
    d.pop("torch_dtype", None)
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if wire is not None:
        wire(model)
    model.to(getattr(torch, dtype)).save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)


def _wire_bigram(tokenizer, reply: str):
    """A function that turns a model into a bigram table: every layer's output projections are zero, so the
    last hidden state is the current token's embedding; the embedding of each token on the reply's path
    is a one-hot, and lm_head maps it to the next token of the reply. Greedy decoding after the chat
    template's generation prompt then writes `reply` and </s>, whatever the prompt."""
    import torch

    start = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"][-1]
    path = [start, *tokenizer(reply, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    if len(set(path[:-1])) != len(path) - 1:
        raise RuntimeError(f"rehearsal generator: the reply {reply!r} repeats a token; choose another")

    def wire(model):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            embed, head = model.model.embed_tokens.weight, model.lm_head.weight
            if len(path) - 1 > embed.shape[1]:
                raise RuntimeError("rehearsal generator: the reply is longer than the hidden size")
            embed.zero_()
            head.zero_()
            for i, (tok, nxt) in enumerate(zip(path, path[1:])):
                embed[tok, i] = 1.0
                head[nxt, i] = 10.0
    return wire


# --------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------

def _write(tmp: Path, name: str, rows: list | str) -> None:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    text = rows if isinstance(rows, str) else "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")


def run_rehearsal_data(cfg: RehearsalDataConfig) -> dict:
    """Write the rehearsal's model, generator, datasets and benchmarks into `cfg.out` (atomically)."""
    check_config(cfg)
    world = build_world(cfg.seed, "quick")
    rng = random.Random(f"upstack-rehearsal-{cfg.seed}")
    files = {**training_sets(world, cfg, rng), **benchmark_sets(world, cfg, rng)}
    texts = [r["text"] for r in files["fineweb-edu/sample-10BT/train.jsonl"]]
    for r in files["alpaca-gpt4-data/train.jsonl"]:
        texts += [r["instruction"], r["input"], r["output"]]
    for r in files["orca_dpo_pairs/train.jsonl"]:
        texts += [r["system"], r["question"], r["chosen"], r["rejected"]]
    texts += [r["response"] for r in files["metamath_math.jsonl"]]
    texts += [GENERATOR_REPLY, "The answer is: 0123456789 $ + = - * / \\ ( ) { } [ ] ^ _ # ."]
    base = base_config(cfg)
    with atomic_output_dir(cfg.out, cfg.overwrite) as tmp:
        for name, rows in files.items():
            _write(tmp, name, rows)
        tok = train_tokenizer(texts, tmp / "tokenizer", vocab_size=base["vocab_size"])
        if len(tok) > base["vocab_size"]:
            raise RuntimeError(f"rehearsal tokenizer has {len(tok)} tokens, more than the model's {base['vocab_size']}")
        _save_model(base, tmp / "tokenizer", tmp / "base", cfg.seed, "bfloat16")
        gen = {**base, "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 64,
               "num_attention_heads": 4, "num_key_value_heads": 1}
        _save_model(gen, tmp / "tokenizer", tmp / "generator", cfg.seed, "bfloat16",
                    wire=_wire_bigram(tok, GENERATOR_REPLY))
        manifest = {"generator": "upstack.data.rehearsal", "seed": cfg.seed, "like": cfg.like,
                    "base_config": base, "tokenizer_tokens": len(tok),
                    "files": {name: (len(rows) if isinstance(rows, list) else None) for name, rows in files.items()}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
