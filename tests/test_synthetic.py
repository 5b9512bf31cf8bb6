"""The synthetic task world (upstack.data.synthetic), its tokenizer, and `upstack synth-data`."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from upstack.cli import main
from upstack.data import synthetic
from upstack.data.synthetic import ATTRIBUTES, QUESTIONS, generate_world, ngram_overlap

FILES = ["pretrain.jsonl", "sft_math.jsonl", "sft_facts.jsonl", "dpo_math.jsonl", "eval/gsm8k/test.jsonl",
         "eval/arc_challenge/test.jsonl", "eval/dpo_heldout.jsonl", "eval/heldout.txt",
         "eval/preference/test.jsonl", "eval/math_heldout.jsonl"]


def test_preference_task_mirrors_heldout_pairs(world):
    out, _ = world
    pairs = _jsonl(out / "eval" / "dpo_heldout.jsonl")
    items = _jsonl(out / "eval" / "preference" / "test.jsonl")
    assert len(items) == len(pairs)
    keys = [it["answerKey"] for it in items]
    assert 0 < keys.count("A") < len(keys)  # the chosen answer is not always first
    for pair, it in zip(pairs, items):
        choices = {c["label"]: c["text"] for c in it["question"]["choices"]}
        assert it["question"]["stem"] == pair["prompt"]
        assert choices[it["answerKey"]] == pair["chosen"]
        assert choices["B" if it["answerKey"] == "A" else "A"] == pair["rejected"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _is_wrong(answer: str) -> bool:
    try:
        return not _check_worked_answer(answer)
    except AssertionError:  # the final line contradicts the steps
        return True


def _check_rejected_kind(r: dict) -> None:
    """The rejected answer is wrong in exactly the way its kind says."""
    chosen, rejected = r["chosen"].split("\n"), r["rejected"].split("\n")
    ops = [re.findall(r" ([+\-*]) ", text) for text in (r["chosen"], r["rejected"])]
    assert len(chosen) == len(rejected)
    if r["kind"] == "final_line":  # every step right, the last line contradicts them
        assert chosen[:-1] == rejected[:-1] and _is_wrong(r["rejected"])
    elif r["kind"] == "slip":  # same operations, one result off
        assert ops[0] == ops[1] and not _check_worked_answer(r["rejected"])
    else:  # one step with another operation, every step computed correctly from there on
        assert r["kind"] == "operation"
        assert _check_worked_answer(r["rejected"])
        flipped = [(a, b) for a, b in zip(ops[0], ops[1]) if a != b]
        assert len(flipped) == 1 and flipped[0] in {("+", "-"), ("-", "+"), ("*", "+")}, r


def _check_worked_answer(answer: str) -> int:
    """Every 'x op y = r.' line computes correctly and the answer ends with '#### r' of the last line."""
    lines = answer.split("\n")
    assert re.fullmatch(r"#### \d+", lines[-1]), answer
    results = []
    for line in lines[:-1]:
        m = re.fullmatch(r".+: (\d+) ([+\-*]) (\d+) = (\d+)\.", line)
        assert m, line
        x, op, y, r = int(m[1]), m[2], int(m[3]), int(m[4])
        results.append((x + y if op == "+" else x - y if op == "-" else x * y) == r)
    assert int(lines[-1][5:]) == int(re.search(r"= (\d+)\.$", lines[-2])[1])
    return all(results)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("w") / "world"
    start = time.perf_counter()
    manifest = generate_world(out, seed=0, scale="quick")
    elapsed = time.perf_counter() - start
    assert elapsed < 4, f"quick world took {elapsed:.2f}s (budget 2s, slack for a loaded machine)"
    return out, manifest


def test_files_rows_and_manifest(world):
    out, manifest = world
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert sorted(manifest["files"]) == sorted(FILES)
    sizes = synthetic.SCALES["quick"]
    expected = {"pretrain.jsonl": sizes.pretrain_docs, "sft_math.jsonl": sizes.sft_math,
                "sft_facts.jsonl": sizes.sft_facts, "dpo_math.jsonl": sizes.dpo_math,
                "eval/gsm8k/test.jsonl": sizes.eval_gsm8k, "eval/arc_challenge/test.jsonl": sizes.eval_arc,
                "eval/dpo_heldout.jsonl": sizes.eval_dpo, "eval/heldout.txt": sizes.heldout_docs}
    for name, rows in expected.items():
        text = (out / name).read_text(encoding="utf-8")
        assert len(text.splitlines()) == rows == manifest["files"][name]["rows"], name
    assert manifest["seed"] == 0 and manifest["scale"] == "quick"
    assert manifest["disjointness"]["passed"] is True
    assert manifest["vocabulary"]["corpus_distinct_words"] < 1000  # small on purpose


def test_row_formats(world):
    out, _ = world
    for r in _jsonl(out / "pretrain.jsonl"):
        assert set(r) == {"text"} and r["text"]
    for name in ("sft_math.jsonl", "sft_facts.jsonl"):
        for r in _jsonl(out / name):
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert all(m["content"] for m in r["messages"])
    for r in _jsonl(out / "sft_math.jsonl"):
        assert _check_worked_answer(r["messages"][1]["content"])
    for r in _jsonl(out / "eval/gsm8k/test.jsonl"):
        assert set(r) == {"question", "answer"}
        assert _check_worked_answer(r["answer"])
    for name in ("dpo_math.jsonl", "eval/dpo_heldout.jsonl"):
        rows = _jsonl(out / name)
        for r in rows:
            assert set(r) == {"prompt", "chosen", "rejected", "kind"}
            assert _check_worked_answer(r["chosen"])
            assert r["chosen"].split("####")[1] != r["rejected"].split("####")[1]
            _check_rejected_kind(r)
        counts = {k: sum(r["kind"] == k for r in rows) for k in synthetic.REJECTED_KINDS}
        assert all(0.2 * len(rows) < c < 0.47 * len(rows) for c in counts.values()), (name, counts)
    for r in _jsonl(out / "eval/arc_challenge/test.jsonl"):
        assert set(r) == {"id", "question", "answerKey"}
        choices = r["question"]["choices"]
        assert [c["label"] for c in choices] == ["A", "B", "C", "D"]
        assert len({c["text"] for c in choices}) == 4 and r["answerKey"] in "ABCD"
    assert all(line.strip() for line in (out / "eval/heldout.txt").read_text().splitlines())


def test_facts_are_learnable_and_held_out(world):
    """Eval facts are stated in the corpus (in several phrasings) but never asked in SFT."""
    out, _ = world
    corpus = " ".join(r["text"] for r in _jsonl(out / "pretrain.jsonl"))
    sft_questions = {r["messages"][0]["content"] for r in _jsonl(out / "sft_facts.jsonl")}
    sft_text = " ".join(m["content"] for r in _jsonl(out / "sft_facts.jsonl") for m in r["messages"])
    attr_of_stem = {}
    for attr, qs in QUESTIONS.items():
        for q in qs:
            attr_of_stem[re.escape(q).replace(re.escape("{n}"), "(\\w+)")] = attr
    for r in _jsonl(out / "eval/arc_challenge/test.jsonl"):
        stem = r["question"]["stem"]
        assert stem not in sft_questions
        name, attr = next((re.fullmatch(p, stem)[1], a) for p, a in attr_of_stem.items() if re.fullmatch(p, stem))
        answer = next(c["text"] for c in r["question"]["choices"] if c["label"] == r["answerKey"])
        assert answer in ATTRIBUTES[attr]
        phrasings = [synthetic._statement(attr, i, name, answer)[:-1] for i in range(len(synthetic.STATEMENTS[attr]))]
        assert any(s in corpus for s in phrasings), stem  # the fact is in the corpus ...
        assert name in corpus and name not in sft_text  # ... and the person never appears in SFT
        for c in r["question"]["choices"]:  # no wrong choice is stated as this person's fact
            if c["text"] != answer:
                assert synthetic._statement(attr, 0, name, c["text"])[:-1] not in corpus


def test_heldout_text_and_math_are_unseen(world):
    out, _ = world
    train = [r["text"] for r in _jsonl(out / "pretrain.jsonl")]
    train += [m["content"] for n in ("sft_math.jsonl", "sft_facts.jsonl") for r in _jsonl(out / n)
              for m in r["messages"]]
    train += [r[k] for r in _jsonl(out / "dpo_math.jsonl") for k in ("prompt", "chosen", "rejected")]
    heldout = (out / "eval/heldout.txt").read_text().splitlines()
    gsm = [r["question"] + "\n" + r["answer"] for r in _jsonl(out / "eval/gsm8k/test.jsonl")]
    assert ngram_overlap(heldout + gsm, train) == []
    train_questions = {r["messages"][0]["content"] for r in _jsonl(out / "sft_math.jsonl")}
    train_questions |= {r["prompt"] for r in _jsonl(out / "dpo_math.jsonl")}
    assert not train_questions & {r["question"] for r in _jsonl(out / "eval/gsm8k/test.jsonl")}
    assert not train_questions & {r["prompt"] for r in _jsonl(out / "eval/dpo_heldout.jsonl")}


def test_overlap_checks_catch_a_leak():
    doc = "Zorvan lives in Pelmar. Zorvan has a pet owl. Zorvan works as a baker by trade now."
    assert ngram_overlap(["Intro. " + doc], ["Other words. " + doc.upper()]) == ["Intro. " + doc]
    assert ngram_overlap([doc], ["Zorvan lives in Pelmar."]) == []
    assert synthetic.exact_overlap(["Where does  Zorvan live?"], ["where does zorvan live"]) != []
    rows = synthetic.build_world(0, "quick")
    rows.pop("_splits")
    leaked = rows["eval/gsm8k/test.jsonl"][3]
    rows["sft_math.jsonl"].append({"messages": [{"role": "user", "content": leaked["question"]},
                                                {"role": "assistant", "content": leaked["answer"]}]})
    result = synthetic.check_disjoint(rows)
    assert not result["passed"]
    assert result["exact_question_overlap"]["eval/gsm8k/test.jsonl"] == 1
    assert result["ngram_overlap"]["eval/gsm8k/test.jsonl"] == 1


def test_deterministic_and_seeded(tmp_path, world):
    out, manifest = world
    again = generate_world(tmp_path / "again", seed=0, scale="quick")
    assert again == manifest
    for name in FILES + ["manifest.json"]:
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    other = synthetic.build_world(seed=1, scale="quick")
    assert other["pretrain.jsonl"] != synthetic.build_world(seed=0, scale="quick")["pretrain.jsonl"]


def test_default_scale_is_bigger_and_fast():
    start = time.perf_counter()
    rows = synthetic.build_world(0, "default")
    rows.pop("_splits")
    assert synthetic.check_disjoint(rows)["passed"]
    assert time.perf_counter() - start < 10
    quick = synthetic.SCALES["quick"]
    assert len(rows["pretrain.jsonl"]) >= 3 * quick.pretrain_docs
    assert len(rows["sft_math.jsonl"]) >= 3 * quick.sft_math
    assert len(rows["eval/arc_challenge/test.jsonl"]) > quick.eval_arc


def test_tokenizer(tmp_path, world):
    from transformers import AutoTokenizer

    from upstack.data.tokenizer import train_tokenizer

    out, _ = world
    texts = [r["text"] for r in _jsonl(out / "pretrain.jsonl")]
    texts += [m["content"] for r in _jsonl(out / "sft_math.jsonl") for m in r["messages"]]
    train_tokenizer(texts, tmp_path / "a", vocab_size=400)
    train_tokenizer(texts, tmp_path / "b", vocab_size=400)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()

    tok = AutoTokenizer.from_pretrained(tmp_path / "a")  # offline: HF_HUB_OFFLINE=1 in conftest
    assert len(tok) == 400
    assert [tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    pieces = tok.tokenize("Zorvan has 12345 apples.")
    assert [p for p in pieces if any(ch.isdigit() for ch in p)] == ["1", "2", "3", "4", "5"]
    text = "Norsel buys 3 bags of 7: 3 * 7 = 21.\n#### 21 — ünïcode ok"
    assert tok.decode(tok(text)["input_ids"]) == text

    msgs = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 5.\n#### 5"}]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert rendered == "<s>user\nWhat is 2 + 3?</s>\n<s>assistant\n2 + 3 = 5.\n#### 5</s>\n"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s>user\nWhat is 2 + 3?</s>\n<s>assistant\n"
    enc = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = enc["input_ids"], enc["assistant_masks"]
    assert ids.count(tok.bos_token_id) == 2  # <s> is one special token, not split
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "2 + 3 = 5.\n#### 5</s>"

    # the demo's rows fit a short context
    longest = max(len(tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
                  for r in _jsonl(out / "sft_math.jsonl"))
    assert longest <= 256


def test_tokenizer_rejects_tiny_vocab(tmp_path):
    from upstack.data.tokenizer import train_tokenizer
    from upstack.errors import ConfigError

    with pytest.raises(ConfigError, match="too small"):
        train_tokenizer(["abc"], tmp_path / "t", vocab_size=100)


def test_cli_synth_data(tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["synth-data", str(out), "--scale", "quick", "--seed", "3", "--tokenizer-vocab", "300",
                 "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["seed"] == 3 and manifest["tokenizer"]["vocab_size"] == 300
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "eval/gsm8k/test.jsonl").is_file()
    assert main(["synth-data", str(out), "--scale", "quick"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["synth-data", str(tmp_path / "x"), "--tokenizer-vocab", "50"]) == 2
    assert "too small" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["w"]  # no temporary folders left behind


def test_config_from_dict():
    from upstack.config import config_from_dict
    from upstack.errors import ConfigError

    cfg = config_from_dict(synthetic.SynthDataConfig, {"out": "w", "scale": "quick", "seed": 2})
    assert cfg.scale == "quick" and cfg.seed == 2
    with pytest.raises(ConfigError, match="scale"):
        config_from_dict(synthetic.SynthDataConfig, {"out": "w", "scale": "huge"})
