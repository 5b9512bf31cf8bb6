"""The demo's task world: a seeded, procedurally generated corpus, instruction sets, preference pairs
and held-out evaluation sets, small enough that a ~1M-10M parameter model learns visible effects on a
laptop CPU in minutes.

The world has invented people with five attributes (town, favourite colour, pet, job, favourite food)
and arithmetic on small numbers. The pretraining corpus states every fact in several phrasings;
instruction tuning teaches two skills (answer a question about a fact; solve a 2-3 step word problem
with a worked answer ending `#### n`); DPO pairs a correct worked answer against a wrong one (a careless
final line, an arithmetic slip, or a wrong operation).
Evaluation sets come from disjoint splits (people whose facts are only *stated* in the corpus, never
asked about in training; word problems with other names and number tuples; arithmetic statements and
people that never appear in training at all), and `generate_world` checks that no evaluation example
shares its question (normalised) or any 13-gram with a training file before it writes anything.

Everything is drawn from one `random.Random(seed)`: same seed and scale, same bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import random
from pathlib import Path
from typing import Literal

from upstack.data.ngrams import exact_overlap, ngram_overlap
from upstack.data.ngrams import words as ngram_words
from upstack.data.tokenizer import train_tokenizer
from upstack.data.word_problems import (
    OBJECTS,
    REJECTED_KINDS,  # noqa: F401  (re-exported: tests and docs name it here)
    TEMPLATES,
    apply_op,
    math_pair,
    sample_problems,
)
from upstack.errors import ConfigError
from upstack.outputs import atomic_output_dir

SCHEMA_VERSION = 1
MIN_TOKENIZER_VOCAB = 300

# --------------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorldSize:
    """How many of each thing one scale generates."""

    fact_train_people: int  # facts stated in the corpus AND asked about in sft_facts
    fact_eval_people: int  # facts stated in the corpus, asked about only in eval/arc_challenge
    heldout_people: int  # never in any training file: biographies in eval/heldout.txt only
    math_train_names: int
    math_eval_names: int
    pretrain_docs: int
    sft_math: int
    sft_facts: int
    dpo_math: int
    eval_gsm8k: int
    eval_arc: int
    eval_dpo: int
    heldout_docs: int


SCALES: dict[str, WorldSize] = {
    # the whole demo chain trains in < 2 minutes on 2 CPU cores
    "quick": WorldSize(fact_train_people=64, fact_eval_people=32, heldout_people=16, math_train_names=40,
                       math_eval_names=16, pretrain_docs=2000, sft_math=500, sft_facts=500, dpo_math=600,
                       eval_gsm8k=100, eval_arc=100, eval_dpo=300, heldout_docs=100),
    # the 10-minute demo
    "default": WorldSize(fact_train_people=140, fact_eval_people=60, heldout_people=40, math_train_names=60,
                         math_eval_names=24, pretrain_docs=8000, sft_math=2000, sft_facts=2000, dpo_math=1200,
                         eval_gsm8k=250, eval_arc=250, eval_dpo=300, heldout_docs=300),
}

# --------------------------------------------------------------------------------------------------
# The vocabulary of the world (kept small so that a tiny model sees every word many times)
# --------------------------------------------------------------------------------------------------

_SYLLABLES = ("ba", "bel", "cor", "da", "dor", "fen", "gar", "hal", "jo", "ka", "lin", "mar",
              "nor", "pel", "quin", "ra", "sel", "tam", "ul", "ven", "wyn", "xa", "yor", "zor")
TOWNS = ("Pelmora", "Dunwick", "Orlavin", "Kestrel", "Vellmouth", "Karthby", "Misford", "Tarrowen",
         "Quenby", "Halvik", "Ostrin", "Yarlow")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "town": TOWNS,
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "teal", "pink", "grey", "brown"),
    "pet": ("cat", "dog", "rabbit", "parrot", "goat", "horse", "turtle", "hamster", "owl", "fox"),
    "job": ("baker", "farmer", "teacher", "doctor", "painter", "sailor", "miner", "singer", "tailor", "builder"),
    "food": ("bread", "rice", "soup", "cheese", "apples", "fish", "beans", "noodles", "honey", "plums"),
}
# Corpus statements; the first one of each attribute is also the SFT answer.
STATEMENTS: dict[str, tuple[str, ...]] = {
    "town": ("{n} lives in {v}.", "{n}'s home is in {v}.", "{n} has a house in {v}.",
             "The town where {n} lives is {v}."),
    "colour": ("{n}'s favourite colour is {v}.", "{n} likes the colour {v} best.",
               "The favourite colour of {n} is {v}."),
    "pet": ("{n} has a pet {v}.", "{n} keeps {a} {v} as a pet.", "The pet of {n} is {a} {v}."),
    "job": ("{n} works as {a} {v}.", "{n} is {a} {v} by trade.", "{n} has a job as {a} {v}."),
    "food": ("{n}'s favourite food is {v}.", "{n} likes to eat {v} most.", "The food {n} loves most is {v}."),
}
QUESTIONS: dict[str, tuple[str, ...]] = {
    "town": ("Where does {n} live?", "In which town does {n} live?", "Which town is {n}'s home?"),
    "colour": ("What is {n}'s favourite colour?", "Which colour does {n} like best?",
               "What colour does {n} like most?"),
    "pet": ("What pet does {n} have?", "Which animal does {n} keep as a pet?", "What kind of pet does {n} have?"),
    "job": ("What is {n}'s job?", "What does {n} do for work?", "How does {n} earn a living?"),
    "food": ("What is {n}'s favourite food?", "Which food does {n} like to eat most?",
             "What food does {n} love most?"),
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _statement(attr: str, i: int, name: str, value: str) -> str:
    return STATEMENTS[attr][i].format(n=name, v=value, a=_article(value))


# --------------------------------------------------------------------------------------------------
# Arithmetic statements (corpus and held-out text)
# --------------------------------------------------------------------------------------------------

_ARITH_PHRASES = {
    "+": ("{a} plus {b} is {c}.", "{a} + {b} = {c}.", "The sum of {a} and {b} is {c}."),
    "-": ("{a} minus {b} is {c}.", "{a} - {b} = {c}.", "{b} taken from {a} leaves {c}."),
    "*": ("{a} times {b} is {c}.", "{a} * {b} = {c}.", "The product of {a} and {b} is {c}."),
}


def _arith_triples() -> list[tuple[int, str, int]]:
    out = [(a, "+", b) for a in range(1, 51) for b in range(1, 51)]
    out += [(a, "-", b) for a in range(2, 61) for b in range(1, a + 1)]
    out += [(a, "*", b) for a in range(2, 13) for b in range(2, 13)]
    return out



def _arith_sentence(rng: random.Random, t: tuple[int, str, int]) -> str:
    a, op, b = t
    return rng.choice(_ARITH_PHRASES[op]).format(a=a, b=b, c=apply_op(a, op, b))



# --------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------


def _names(rng: random.Random) -> list[str]:
    names = sorted({(a + b).capitalize() for a, b in itertools.product(_SYLLABLES, repeat=2) if a != b}
                   - set(TOWNS))
    rng.shuffle(names)
    return names


def _people(rng: random.Random, names: list[str]) -> list[dict]:
    return [{"name": n, **{attr: rng.choice(values) for attr, values in ATTRIBUTES.items()}} for n in names]


def _biography(rng: random.Random, person: dict) -> str:
    attrs = rng.sample(list(ATTRIBUTES), rng.randint(2, len(ATTRIBUTES)))
    return " ".join(_statement(a, rng.randrange(len(STATEMENTS[a])), person["name"], person[a]) for a in attrs)


def _arith_doc(rng: random.Random, triples: list[tuple[int, str, int]]) -> str:
    return " ".join(_arith_sentence(rng, rng.choice(triples)) for _ in range(rng.randint(4, 7)))


def _documents(rng: random.Random, people: list[dict], triples: list, count: int) -> list[str]:
    """`count` short documents: about 70% biographies (every person in turn), 30% arithmetic."""
    docs, order = [], []
    for _ in range(count):
        if rng.random() < 0.7:
            if not order:
                order = list(people)
                rng.shuffle(order)
            docs.append(_biography(rng, order.pop()))
        else:
            docs.append(_arith_doc(rng, triples))
    return docs


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _fact_questions(rng: random.Random, people: list[dict], count: int) -> list[tuple[dict, str, int]]:
    """`count` (person, attribute, phrasing) triples, all distinct while there are enough, in random order."""
    combos = [(p, a, q) for p in people for a in ATTRIBUTES for q in range(len(QUESTIONS[a]))]
    rng.shuffle(combos)
    return [combos[i % len(combos)] for i in range(count)]


def _arc_item(rng: random.Random, i: int, person: dict, attr: str, q: int) -> dict:
    correct = person[attr]
    choices = [correct] + rng.sample([v for v in ATTRIBUTES[attr] if v != correct], 3)
    rng.shuffle(choices)
    labels = "ABCD"
    return {
        "id": f"synth-fact-{i:05d}",
        "question": {"stem": QUESTIONS[attr][q].format(n=person["name"]),
                     "choices": [{"text": c, "label": lab} for c, lab in zip(choices, labels)]},
        "answerKey": labels[choices.index(correct)],
    }


def build_world(seed: int = 0, scale: str = "default") -> dict[str, list]:
    """All rows of the world, by relative file name, in memory (no checks, no writing)."""
    if scale not in SCALES:
        raise ConfigError(f"scale: {scale!r} is not one of {', '.join(SCALES)}")
    size = SCALES[scale]
    rng = random.Random(f"upstack-synthetic-{seed}")

    # Disjoint name pools: each name belongs to one role only.
    names = _names(rng)
    cuts = list(itertools.accumulate([size.fact_train_people, size.fact_eval_people, size.heldout_people,
                                      size.math_train_names, size.math_eval_names]))
    if cuts[-1] > len(names):
        raise ConfigError(f"scale {scale!r} needs {cuts[-1]} names but only {len(names)} exist")
    pools = [names[a:b] for a, b in zip([0] + cuts[:-1], cuts)]
    fact_train, fact_eval, heldout_people = (_people(rng, p) for p in pools[:3])
    math_train_names, math_eval_names = pools[3], pools[4]

    # Arithmetic statements: 10% of (a, op, b) triples appear only in the held-out text.
    triples = _arith_triples()
    rng.shuffle(triples)
    cut = len(triples) // 10
    heldout_triples, train_triples = triples[:cut], triples[cut:]

    rows: dict[str, list] = {}
    # Corpus: facts about every person who is asked about (in training or in eval), and arithmetic.
    rows["pretrain.jsonl"] = [{"text": d} for d in _documents(rng, fact_train + fact_eval, train_triples,
                                                               size.pretrain_docs)]
    rows["sft_facts.jsonl"] = [
        _chat(QUESTIONS[a][q].format(n=p["name"]), _statement(a, 0, p["name"], p[a]))
        for p, a, q in _fact_questions(rng, fact_train, size.sft_facts)]

    # Word problems: evaluation problems first; training problems never reuse their (template, numbers).
    used: set = set()
    eval_math = sample_problems(rng, math_eval_names, size.eval_gsm8k, used)
    eval_dpo = sample_problems(rng, math_eval_names, size.eval_dpo, used)
    eval_keys = set(used)
    sft_math = sample_problems(rng, math_train_names, size.sft_math, set(eval_keys))
    dpo_math = sample_problems(rng, math_train_names, size.dpo_math, set(eval_keys))
    rows["sft_math.jsonl"] = [_chat(p.question(), p.answer()) for p in sft_math]
    rows["dpo_math.jsonl"] = [math_pair(rng, p) for p in dpo_math]

    rows["eval/gsm8k/test.jsonl"] = [{"question": p.question(), "answer": p.answer()} for p in eval_math]
    facts = [(p, a) for p in fact_eval for a in ATTRIBUTES]
    if size.eval_arc > len(facts):
        raise ConfigError(f"scale {scale!r}: {size.eval_arc} ARC items need more than {len(facts)} eval facts")
    rows["eval/arc_challenge/test.jsonl"] = [
        _arc_item(rng, i, p, a, rng.randrange(len(QUESTIONS[a])))
        for i, (p, a) in enumerate(rng.sample(facts, size.eval_arc))]
    rows["eval/dpo_heldout.jsonl"] = [math_pair(rng, p) for p in eval_dpo]
    rows["eval/heldout.txt"] = _documents(rng, heldout_people, heldout_triples, size.heldout_docs)
    # Held-out worked answers as text, for perplexity: how well a model predicts the answer style it is taught.
    rows["eval/math_heldout.jsonl"] = [{"text": p.question() + "\n" + p.answer()} for p in eval_math]
    # The held-out pairs again as a two-choice ARC-format task: "preference accuracy" (does the model
    # give the chosen answer a higher log-likelihood than the rejected one?) through `upstack eval`.
    pref_rng = random.Random(f"upstack-preference-{seed}")
    pref = []
    for i, r in enumerate(rows["eval/dpo_heldout.jsonl"]):
        first = pref_rng.random() < 0.5
        texts = [r["chosen"], r["rejected"]] if first else [r["rejected"], r["chosen"]]
        pref.append({"id": f"pref-{i}", "question": {"stem": r["prompt"], "choices": [
            {"text": t, "label": lab} for t, lab in zip(texts, "AB")]}, "answerKey": "A" if first else "B"})
    rows["eval/preference/test.jsonl"] = pref

    rows["_splits"] = [{
        "fact_train_people": len(fact_train), "fact_eval_people": len(fact_eval),
        "heldout_people": len(heldout_people), "math_train_names": len(math_train_names),
        "math_eval_names": len(math_eval_names), "arithmetic_train_triples": len(train_triples),
        "arithmetic_heldout_triples": len(heldout_triples),
    }]
    return rows


def _train_texts(rows: dict[str, list]) -> tuple[list[str], list[str]]:
    """(training questions/prompts, all training text) of the world's training files."""
    questions = [r["messages"][0]["content"] for f in ("sft_math.jsonl", "sft_facts.jsonl") for r in rows[f]]
    questions += [r["prompt"] for r in rows["dpo_math.jsonl"]]
    texts = [r["text"] for r in rows["pretrain.jsonl"]]
    texts += [m["content"] for f in ("sft_math.jsonl", "sft_facts.jsonl") for r in rows[f] for m in r["messages"]]
    texts += [r[k] for r in rows["dpo_math.jsonl"] for k in ("prompt", "chosen", "rejected")]
    return questions, texts


def check_disjoint(rows: dict[str, list], n: int = 13) -> dict:
    """Check every evaluation set against every training file; return the counts (all must be 0).

    Exact match: an eval question (GSM8K question, ARC stem, held-out DPO prompt, held-out document)
    whose normalised text equals a training question or prompt (or, for documents, a corpus document).
    n-gram: an eval item (question with its answer or choices) sharing any word 13-gram with any
    training text. Short items (an ARC stem has < 13 words) are covered by the exact-match test and by
    construction (their people are never asked about in training).
    """
    train_questions, train_texts = _train_texts(rows)
    gsm = rows["eval/gsm8k/test.jsonl"]
    arc = rows["eval/arc_challenge/test.jsonl"]
    dpo = rows["eval/dpo_heldout.jsonl"]
    held = rows["eval/heldout.txt"]
    eval_questions = {
        "eval/gsm8k/test.jsonl": [r["question"] for r in gsm],
        "eval/arc_challenge/test.jsonl": [r["question"]["stem"] for r in arc],
        "eval/dpo_heldout.jsonl": [r["prompt"] for r in dpo],
    }
    eval_items = {
        "eval/gsm8k/test.jsonl": [r["question"] + "\n" + r["answer"] for r in gsm],
        "eval/arc_challenge/test.jsonl": [
            r["question"]["stem"] + " " + " ".join(c["text"] for c in r["question"]["choices"]) for r in arc],
        "eval/dpo_heldout.jsonl": [r["prompt"] + "\n" + r["chosen"] + "\n" + r["rejected"] for r in dpo],
        "eval/heldout.txt": held,
    }
    result = {"ngram": n, "exact_question_overlap": {}, "ngram_overlap": {}}
    for name, qs in eval_questions.items():
        result["exact_question_overlap"][name] = len(exact_overlap(qs, train_questions))
    result["exact_question_overlap"]["eval/heldout.txt"] = len(
        exact_overlap(held, [r["text"] for r in rows["pretrain.jsonl"]]))
    eval_all = [(name, t) for name, items in eval_items.items() for t in items]
    hit = set(ngram_overlap([t for _, t in eval_all], train_texts, n))
    for name, items in eval_items.items():
        result["ngram_overlap"][name] = sum(t in hit for t in items)
    result["passed"] = not any(result["exact_question_overlap"].values()) and not any(
        result["ngram_overlap"].values())
    return result


def _encode(rows: list, txt: bool) -> bytes:
    if txt:
        return "".join(d + "\n" for d in rows).encode("utf-8")
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _vocabulary(rows: dict[str, list]) -> dict:
    corpus = [r["text"] for r in rows["pretrain.jsonl"]]
    words = [w for t in corpus for w in ngram_words(t, alnum=True)]
    return {
        "towns": len(TOWNS), **{f"{a}_values": len(v) for a, v in ATTRIBUTES.items() if a != "town"},
        "word_problem_templates": len(TEMPLATES), "objects": len(OBJECTS),
        "corpus_distinct_words": len(set(words)), "corpus_words": len(words),
        "corpus_chars": sum(len(t) for t in corpus),
    }


def generate_world(out_dir: str | Path, seed: int = 0, scale: str = "default", *, overwrite: bool = False,
                   tokenizer_vocab_size: int | None = None) -> dict:
    """Write the synthetic world to `out_dir` (atomically) and return its manifest.

    Files: pretrain.jsonl {"text"}; sft_math.jsonl, sft_facts.jsonl {"messages": [user, assistant]};
    dpo_math.jsonl {"prompt", "chosen", "rejected", "kind"}; eval/gsm8k/test.jsonl {"question", "answer"};
    eval/arc_challenge/test.jsonl (ARC schema); eval/dpo_heldout.jsonl (with "kind", like
    dpo_math.jsonl); eval/preference/test.jsonl (the pairs as a two-choice ARC
    task); eval/heldout.txt (one document a line); eval/math_heldout.jsonl; manifest.json. With `tokenizer_vocab_size`, also tokenizer/ (a byte-level BPE trained on
    the training files; see `upstack.data.tokenizer`). Raises RuntimeError if the held-out sets
    overlap training (a bug in the generator, never expected).
    """
    _check_options(scale, tokenizer_vocab_size)
    rows = build_world(seed, scale)
    splits = rows.pop("_splits")[0]
    disjoint = check_disjoint(rows)
    if not disjoint["passed"]:
        raise RuntimeError(f"synthetic world: held-out sets overlap training: {disjoint}")

    files = {}
    blobs = {}
    for name, items in rows.items():
        blob = _encode(items, name.endswith(".txt"))
        blobs[name] = blob
        files[name] = {"rows": len(items), "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    manifest = {
        "generator": "upstack.data.synthetic", "schema_version": SCHEMA_VERSION, "seed": seed, "scale": scale,
        "sizes": dataclasses.asdict(SCALES[scale]), "splits": splits, "files": files,
        "vocabulary": _vocabulary(rows), "disjointness": disjoint,
    }
    with atomic_output_dir(out_dir, overwrite) as tmp:
        for name, blob in blobs.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        if tokenizer_vocab_size:
            _, texts = _train_texts(rows)
            train_tokenizer(texts, tmp / "tokenizer", vocab_size=tokenizer_vocab_size)
            manifest["tokenizer"] = {"path": "tokenizer", "vocab_size": tokenizer_vocab_size}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


@dataclasses.dataclass
class SynthDataConfig:
    """`upstack synth-data` / a recipe's synth-data stage."""

    out: str
    seed: int = 0
    scale: Literal["quick", "default"] = "default"
    tokenizer_vocab_size: int | None = None
    overwrite: bool = False


def check_config(cfg: SynthDataConfig) -> None:
    """The values of a synth-data run: a known scale, a tokenizer vocabulary a byte-level BPE can have."""
    _check_options(cfg.scale, cfg.tokenizer_vocab_size)


def _check_options(scale: str, tokenizer_vocab_size: int | None) -> None:
    if tokenizer_vocab_size is not None and tokenizer_vocab_size < MIN_TOKENIZER_VOCAB:
        raise ConfigError(f"tokenizer_vocab_size: {tokenizer_vocab_size} is too small for a byte-level BPE "
                          f"(256 byte tokens + 4 special tokens + merges; use >= {MIN_TOKENIZER_VOCAB})")
    if scale not in SCALES:
        raise ConfigError(f"scale: {scale!r} is not one of {', '.join(SCALES)}")


def run_synth_data(cfg: SynthDataConfig) -> dict:
    check_config(cfg)
    return generate_world(cfg.out, cfg.seed, cfg.scale, overwrite=cfg.overwrite,
                          tokenizer_vocab_size=cfg.tokenizer_vocab_size)
