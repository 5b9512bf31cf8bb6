"""Synth. Math-Instruct / -Alignment (upstack.data.synth_math) and `upstack synth-math`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from upstack.cli import main
from upstack.data.synth_math import (
    SeedRow,
    SynthMathConfig,
    answers_match,
    extract_final_answer,
    load_prompts,
    normalize_answer,
    read_seed_rows,
    render_prompt,
    run_synth_math,
    synthesize,
)
from upstack.errors import ConfigError, DataError, OutputExistsError

METAMATH = [
    {"query": "James has 3 apples and buys 4 more. How many apples does he have?",
     "response": "James has 3 + 4 = 7 apples.\nThe answer is: 7", "type": "GSM_Rephrased"},
    {"query": "What is $\\frac{1}{2}+\\frac{1}{4}$?",
     "response": "We have $\\frac{1}{2}+\\frac{1}{4}=\\frac{3}{4}$.\nThe answer is: \\frac{3}{4}", "type": "MATH_AnsAug"},
]
MATH = [
    {"problem": "Compute $\\dbinom{5}{2}$.", "solution": "$\\dbinom{5}{2} = \\boxed{10}$.", "level": "Level 1"},
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
    {"problem": "Find the set.", "solution": "First $\\boxed{3}$, finally $\\boxed{\\{1, \\{2\\}\\}}$."},
]


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------- answers

def test_extract_gsm8k_real_rows(shared_data):
    fmt, rows = read_seed_rows(shared_data / "gsm8k" / "train_first500.jsonl")
    assert fmt == "gsm8k" and len(rows) == 500
    finals = [extract_final_answer(r.answer, "gsm8k") for r in rows]
    assert finals[:3] == ["72", "10", "5"]
    assert all(f is not None for f in finals)
    assert all(normalize_answer(f).lstrip("-").replace("/", "").isdigit() for f in finals)  # all numbers
    assert "1,080" in finals and normalize_answer("1,080") == "1080"


def test_extract_metamath_and_math():
    assert extract_final_answer(METAMATH[0]["response"], "metamath") == "7"
    assert extract_final_answer(METAMATH[1]["response"], "metamath") == "\\frac{3}{4}"
    assert extract_final_answer("so...\nThe answer is 12.", "metamath") == "12"
    assert extract_final_answer(MATH[0]["solution"], "math") == "10"
    assert extract_final_answer(MATH[1]["solution"], "math") == "\\frac{1}{2}"
    assert extract_final_answer(MATH[2]["solution"], "math") == "\\{1, \\{2\\}\\}"  # last box, nested braces
    assert extract_final_answer("so $\\boxed 5$.", "math") == "5"
    assert extract_final_answer("\\fbox{x+1}", "math") == "x+1"
    assert extract_final_answer("a\n#### 3\nb\n#### 4", "gsm8k") == "4"
    for fmt, text in [("gsm8k", "no marker 5"), ("gsm8k", "#### "), ("metamath", "It is 5."),
                      ("math", "\\boxed{unclosed"), ("math", "\\boxed{}"), ("math", "5")]:
        assert extract_final_answer(text, fmt) is None, (fmt, text)


@pytest.mark.parametrize("a,b", [
    ("1,000", "1000"), ("72", "72.00"), ("$18", "18"), ("\\$18.", "18"), ("\\frac{1}{2}", "0.5"),
    ("\\dfrac{3}{4}", "3/4"), ("\\frac34", "0.75"), ("-\\frac{1}{2}", "-1/2"), ("90^\\circ", "90"),
    ("50\\%", "50"), ("\\text{(A)}", "(A)"), ("x + 1", "x+1"), ("\\left( 1, 2 \\right)", "(1,2)"),
])
def test_answers_match(a, b):
    assert answers_match(a, b)


@pytest.mark.parametrize("a,b", [("72", "27"), ("1/2", "1/3"), ("7", "-7"), ("x+1", "x-1"), ("1,00", "100")])
def test_answers_differ(a, b):
    assert not answers_match(a, b)


# ---------------------------------------------------------------------------------------------- reading

def test_read_formats(tmp_path):
    fmt, rows = read_seed_rows(_write_jsonl(tmp_path / "m.jsonl", METAMATH))
    assert fmt == "metamath" and rows[1] == SeedRow(2, METAMATH[1]["query"], METAMATH[1]["response"])
    fmt, rows = read_seed_rows(_write_jsonl(tmp_path / "x.jsonl", MATH), limit=2)
    assert fmt == "math" and len(rows) == 2
    (tmp_path / "a.json").write_text(json.dumps(MATH))
    assert read_seed_rows(tmp_path / "a.json", "math")[1][2].question == "Find the set."


@pytest.mark.parametrize("content,fmt,message", [
    ('{"query": "q", "response": "r"}\n{bad json\n', "auto", r"bad\.jsonl:2: not valid JSON"),
    ('{"query": "q"}\n', "metamath", r"bad\.jsonl:1: missing field 'response'"),
    ('{"query": "q", "response": ""}\n', "metamath", r":1: field 'response' must be a non-empty string"),
    ('{"question": "q", "answer": "a"}\n{"question": "q"}\n', "auto", r":2: missing field 'answer'"),
    ('{"text": "hello"}\n', "auto", r":1: cannot tell the format from fields \['text'\]"),
    ('[1, 2]\n', "auto", r":1: expected a JSON object"),
    ('\n\n', "auto", r"no rows"),
])
def test_read_errors(tmp_path, content, fmt, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_seed_rows(path, fmt)


def test_read_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_seed_rows(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------- prompts

def test_prompts_shipped_and_overridable(tmp_path):
    prompts = load_prompts()
    assert "{question}" in prompts["question"] and "{answer}" in prompts["answer"]
    rendered = render_prompt(prompts["answer"], "Q {x}?", "A \\boxed{5}", "math")
    assert "Q {x}?" in rendered and "A \\boxed{5}" in rendered and "\\boxed{}" in rendered
    assert "{final_answer_instruction}" not in rendered

    (tmp_path / "rephrase_question.txt").write_text("Say it again: {question}\n\n")
    custom = load_prompts(tmp_path)
    assert custom["question"] == "Say it again: {question}" and custom["answer"] == prompts["answer"]
    (tmp_path / "rephrase_answer.txt").write_text("no placeholder here")
    with pytest.raises(ConfigError, match="must contain the placeholder {answer}"):
        load_prompts(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        load_prompts(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- core

ROWS = [SeedRow(i + 1, f"Q{i}: what is {i} + {i}?", f"{i} + {i} = {2 * i}\n#### {2 * i}") for i in range(7)]
ROWS.append(SeedRow(8, "Q7: no final answer here", "it is eight"))


def _controlled(prompts: list[str]) -> list[str]:
    """A generator whose output depends on the row: Q0-Q2 keep, Q3 wrong answer, Q4 no answer, Q5 empty question."""
    out = []
    for p in prompts:
        i = int(re.search(r"Q(\d+):", p)[1])
        if p.startswith("Rephrase"):
            out.append("" if i == 5 else f"  Rephrased question {i}?  ")
        elif i == 3:
            out.append("Twice 3 is 7.\n#### 7")
        elif i == 4:
            out.append("Twice 4 is eight.")
        else:
            out.append(f"Twice {i} is {2 * i}.\n#### {2 * i}.0" if i == 6 else f"Twice {i}.\n#### {2 * i}")
    return out


def test_synthesize_counts_and_rows():
    calls = []

    def generate(prompts):
        calls.append(len(prompts))
        return _controlled(prompts)

    instruct, alignment, stats, dropped = synthesize(ROWS, generate, "gsm8k", batch_size=3)
    assert stats["read"] == 8 and stats["dropped_seed_unparseable"] == 1 and stats["generated"] == 7
    assert (stats["kept"], stats["dropped_answer_mismatch"], stats["dropped_unparseable"],
            stats["dropped_empty_question"]) == (4, 1, 1, 1)
    assert stats["read"] == stats["dropped_seed_unparseable"] + stats["generated"]
    assert stats["generated"] == stats["kept"] + sum(v for k, v in stats.items()
                                                     if k.startswith("dropped_") and k != "dropped_seed_unparseable")
    assert calls == [3, 3, 3, 3, 1, 1]  # questions then answers, per batch of <= 3 rows
    assert len(instruct) == len(alignment) == 4
    # Paper: prompt = rephrased question, chosen = rephrased answer, rejected = original answer.
    assert alignment[0] == {"prompt": "Rephrased question 0?", "chosen": "Twice 0.\n#### 0", "rejected": ROWS[0].answer}
    assert instruct[0] == {"messages": [{"role": "user", "content": "Rephrased question 0?"},
                                        {"role": "assistant", "content": "Twice 0.\n#### 0"}]}
    assert alignment[3]["chosen"].endswith("#### 12.0")  # 12.0 == 12
    assert {d["line"]: d["reason"] for d in dropped} == {4: "answer_mismatch", 5: "unparseable", 6: "empty_question"}
    assert dropped[0]["expected"] == "6" and dropped[0]["got"] == "7"


def test_synthesize_rejects_bad_generator():
    with pytest.raises(Exception, match="returned 1 texts for 2 prompts"):
        synthesize(ROWS[:2], lambda p: ["x"], "gsm8k", batch_size=2)


def test_run_synth_math_writes_atomically(tmp_path):
    seed = _write_jsonl(tmp_path / "seed.jsonl", [{"question": r.question, "answer": r.answer} for r in ROWS])
    cfg = SynthMathConfig(seed_data=str(seed), model="unused", out=str(tmp_path / "out"), batch_size=4,
                          quiet=True)
    stats = run_synth_math(cfg, generate_fn=_controlled)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["alignment.jsonl", "dropped.jsonl", "instruct.jsonl", "stats.json"]
    assert json.loads((out / "stats.json").read_text())["kept"] == stats["kept"] == 4
    assert len(_read_jsonl(out / "instruct.jsonl")) == len(_read_jsonl(out / "alignment.jsonl")) == 4
    assert len(_read_jsonl(out / "dropped.jsonl")) == 3
    with pytest.raises(OutputExistsError):
        run_synth_math(cfg, generate_fn=_controlled)

    def boom(prompts):
        raise RuntimeError("generator died")

    cfg.out = str(tmp_path / "out2")
    with pytest.raises(RuntimeError):
        run_synth_math(cfg, generate_fn=boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "seed.jsonl"]  # nothing half-written


def test_vllm_backend_missing_is_a_clear_error(tmp_path):
    try:
        import vllm  # noqa: F401
        pytest.skip("vllm is installed")
    except ImportError:
        pass
    seed = _write_jsonl(tmp_path / "seed.jsonl", METAMATH)
    rc = main(["synth-math", "--seed-data", str(seed), "--model", "x", "--out", str(tmp_path / "o"),
               "--backend", "vllm"])
    assert rc == 2 and not (tmp_path / "o").exists()


def test_config_from_dict():
    from upstack.config import config_from_dict

    cfg = config_from_dict(SynthMathConfig, {"seed_data": "s.jsonl", "model": "m", "out": "o", "format": "math",
                                             "limit": 10, "temperature": 0.7})
    assert cfg.format == "math" and cfg.temperature == 0.7
    with pytest.raises(ConfigError, match="backend"):
        config_from_dict(SynthMathConfig, {"seed_data": "s", "model": "m", "out": "o", "backend": "tgi"})


# ---------------------------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory) -> Path:
    from tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gen") / "model", "llama", num_hidden_layers=2)


def test_transformers_left_padding_batches_match_single(tiny_generator):
    from upstack.data.synth_math import transformers_generate_fn

    gen = transformers_generate_fn(str(tiny_generator), max_new_tokens=5, device="cpu")
    prompts = ["What is 2 + 2?", "A much longer question about twelve apples and thirty pears, please?"]
    assert gen(prompts) == [gen(prompts[:1])[0], gen(prompts[1:])[0]]


def test_cli_end_to_end_with_tiny_model(tiny_generator, tmp_path, capsys):
    seed = _write_jsonl(tmp_path / "seed.jsonl", METAMATH * 2 + [{"query": "q?", "response": "no final"}])
    out = tmp_path / "out"
    rc = main(["synth-math", "--seed-data", str(seed), "--model", str(tiny_generator), "--out", str(out),
               "--batch-size", "2", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "1", "--json",
               "--quiet"])
    assert rc == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["format"] == "metamath" and stats["read"] == 5 and stats["dropped_seed_unparseable"] == 1
    assert stats["generated"] == 4
    dropped = stats["dropped_empty_question"] + stats["dropped_unparseable"] + stats["dropped_answer_mismatch"]
    assert stats["kept"] + dropped == 4 and dropped >= 3  # random weights do not keep answers
    instruct, alignment = _read_jsonl(out / "instruct.jsonl"), _read_jsonl(out / "alignment.jsonl")
    assert len(instruct) == len(alignment) == stats["kept"]
    assert len(_read_jsonl(out / "dropped.jsonl")) == dropped
    assert json.loads((out / "stats.json").read_text())["kept"] == stats["kept"]

    rc = main(["synth-math", "--seed-data", str(tmp_path / "missing.jsonl"), "--model", str(tiny_generator),
               "--out", str(tmp_path / "o2")])
    assert rc == 2 and "missing.jsonl: no such file" in capsys.readouterr().err
    rc = main(["synth-math", "--seed-data", str(seed), "--model", str(tmp_path / "no-model"), "--out", str(out)])
    assert rc == 2 and "no-model does not exist" in capsys.readouterr().err


class _FakeVLLM:
    """A stand-in `vllm` module with the API upstack calls (LLM(model, seed, dtype), get_tokenizer(),
    generate([{"prompt_token_ids": ...}], SamplingParams, use_tqdm) -> [RequestOutput.outputs[0].text]),
    generating greedily with transformers, so the vLLM path runs here without a GPU."""

    def __init__(self):
        self.calls = []
        fake = self

        class SamplingParams:
            def __init__(self, **kwargs):
                self.__dict__.update(kwargs)
                fake.calls.append(("params", kwargs))

        class LLM:
            def __init__(self, model, seed=0, dtype="auto"):
                from transformers import AutoModelForCausalLM, AutoTokenizer

                fake.calls.append(("llm", {"model": model, "seed": seed, "dtype": dtype}))
                self.tok = AutoTokenizer.from_pretrained(model)
                self.lm = AutoModelForCausalLM.from_pretrained(model).eval()

            def get_tokenizer(self):
                return self.tok

            def generate(self, inputs, params, use_tqdm=True):
                from types import SimpleNamespace

                import torch

                fake.calls.append(("generate", {"n": len(inputs), "use_tqdm": use_tqdm}))
                outs = []
                for item in inputs:
                    ids = torch.tensor([item["prompt_token_ids"]])
                    with torch.no_grad():
                        out = self.lm.generate(ids, max_new_tokens=params.max_tokens, do_sample=False,
                                               pad_token_id=self.tok.pad_token_id)
                    text = self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                    outs.append(SimpleNamespace(outputs=[SimpleNamespace(text=text)]))
                return outs

        self.LLM, self.SamplingParams = LLM, SamplingParams


def test_vllm_backend_matches_transformers(tiny_generator, tmp_path, monkeypatch, capsys):
    """The vLLM path (through a stand-in module) sends chat-templated token ids, maps the sampling options,
    and gives the same greedy outputs, rows and counts as the transformers backend."""
    import sys

    from upstack.data.synth_math import transformers_generate_fn, vllm_generate_fn

    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake)
    prompts = ["What is 2 + 2?", "A much longer question about twelve apples and thirty pears, please?"]
    want = transformers_generate_fn(str(tiny_generator), max_new_tokens=5, device="cpu")(prompts)
    got = vllm_generate_fn(str(tiny_generator), max_new_tokens=5, seed=3)(prompts)
    assert got == want
    kinds = dict(fake.calls[:2])
    assert kinds["llm"] == {"model": str(tiny_generator), "seed": 3, "dtype": "auto"}
    assert kinds["params"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 5, "seed": 3}
    assert fake.calls[2] == ("generate", {"n": 2, "use_tqdm": False})

    seed = _write_jsonl(tmp_path / "seed.jsonl", METAMATH * 2)
    outs = {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / backend
        assert main(["synth-math", "--seed-data", str(seed), "--model", str(tiny_generator), "--out", str(out),
                     "--backend", backend, "--max-new-tokens", "6", "--json", "--quiet"]) == 0
        stats = json.loads(capsys.readouterr().out)
        outs[backend] = (stats["generated"], stats["kept"], (out / "dropped.jsonl").read_text())
    assert outs["vllm"] == outs["transformers"] and outs["vllm"][0] == 4
