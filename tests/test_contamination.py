"""The contamination test for real: a tiny model trained on a benchmark sample must score clearly
higher than the same model before that training, on that sample (neighbour test and Min-K%)."""

import json

import pytest
from conftest import SHARED_DATA
from tiny import build_tiny_model

from upstack.cli import main
from upstack.data.benchmarks import example_text, load_docs
from upstack.evaluate.contamination import (
    ContaminationConfig,
    _prefix,
    contamination,
    verdict,
)

N_EXAMPLES = 16


def load_docs_row(line: str) -> dict:
    from upstack.data.benchmarks import _arc

    return _arc("-", "-", json.loads(line))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(benchmark file, untrained model, the same model trained on the benchmark's examples)."""
    import torch

    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data samples not found at {SHARED_DATA} (set UPSTACK_SHARED_DATA)")
    shared_data = SHARED_DATA
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("contam")
    rows = open(shared_data / "arc_challenge" / "ARC-Challenge-Dev.jsonl").readlines()
    short = [r for r in rows if len(example_text("arc", load_docs_row(r)).encode()) < 200]  # fit the 256 context
    bench = root / "arc_sample.jsonl"
    bench.write_text("".join(short[:N_EXAMPLES]))
    texts = [example_text("arc", d) for d in load_docs("arc", bench)]

    base = build_tiny_model(root / "base", "llama", num_hidden_layers=2, vocab_size=260, hidden_size=64)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):  # a plain loop: memorise the sample
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 1.0
    trained = root / "trained"
    model.save_pretrained(trained)
    tok.save_pretrained(trained)
    return bench, str(base), str(trained)


def _cfg(model, ref, bench, **kw):
    return ContaminationConfig(model=model, reference=ref, benchmarks=[f"arc={bench}"], num_examples=N_EXAMPLES,
                               num_neighbours=8, batch_size=8, device="cpu", **kw)


@pytest.mark.slow
def test_neighbour_test_detects_training_on_the_benchmark(models):
    bench, base, trained = models
    before = contamination(_cfg(base, base, bench))["benchmarks"]["arc"]
    after = contamination(_cfg(trained, base, bench))["benchmarks"]["arc"]
    assert before["examples"] == after["examples"] == N_EXAMPLES
    print(f"neighbour test result before {before['result']:.3f}, after {after['result']:.3f}")
    assert after["result"] >= before["result"] + 0.5, (before["result"], after["result"])
    assert after["result"] > 0.9 and after["verdict"] == "contaminated"
    assert before["result"] < 0.5
    assert after["target_loss"] < before["target_loss"]
    # deterministic: same seed, same neighbours, same numbers
    again = contamination(_cfg(trained, base, bench))["benchmarks"]["arc"]
    assert again["per_example"] == after["per_example"]


@pytest.mark.slow
def test_min_k_rises_after_training(models):
    bench, base, trained = models
    before = contamination(_cfg(base, base, bench, method="min-k"))["benchmarks"]["arc"]
    after = contamination(_cfg(trained, base, bench, method="min-k"))["benchmarks"]["arc"]
    print(f"Min-20% log-prob before {before['target_min_k']:.3f}, after {after['target_min_k']:.3f}")
    assert after["target_min_k"] > before["target_min_k"] + 1.0
    assert after["result"] == 1.0 and before["result"] == 0.0  # model vs its own base: never higher
    no_ref = contamination(_cfg(trained, None, bench, method="min-k"))["benchmarks"]["arc"]
    assert no_ref["target_min_k"] == pytest.approx(after["target_min_k"]) and "result" not in no_ref


def test_cli_report_and_different_tokenizers(models, tmp_path, capsys):
    bench, base, _ = models
    # 300 tokens: the BPE learns merges, so its vocabulary differs from the 260-token byte-level one
    other = build_tiny_model(tmp_path / "other", "llama", num_hidden_layers=1, vocab_size=300, seed=3)
    out = tmp_path / "c.json"
    rc = main(["contamination", base, "--reference", str(other), "--benchmark", str(bench),
               "--num-examples", "3", "--num-neighbours", "4", "--device", "cpu", "--output", str(out), "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "different tokenizers" in text and "arc_sample: result" in text
    res = json.loads(out.read_text())
    assert res["same_tokenizer"] is False and res["benchmarks"]["arc_sample"]["examples"] == 3
    assert res["benchmarks"]["arc_sample"]["verdict"] in ("clean", "inconclusive", "contaminated")


def test_errors(models, tmp_path, capsys):
    bench, base, _ = models

    def err(argv):
        assert main(argv) == 2
        e = capsys.readouterr().err
        assert e.startswith("error: ") and "Traceback" not in e
        return e

    assert "needs --reference" in err(["contamination", base, "--benchmark", str(bench)])
    assert "no such file or folder" in err(["contamination", base, "--reference", base, "--benchmark", "nope.jsonl"])
    assert "not a loadable checkpoint" in err(["contamination", base, "--reference", str(tmp_path),
                                               "--benchmark", str(bench)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": "no marker"}\n')
    assert "bad.jsonl: line 2: field 'answer'" in err(["contamination", base, "--reference", base,
                                                       "--benchmark", str(bad)])
    assert "--prefix-fraction" in err(["contamination", base, "--reference", base, "--benchmark", str(bench),
                                       "--prefix-fraction", "1.5"])


def test_helpers():
    assert _prefix("one two  three four five six seven eight nine ten", 0.4) == "one two  three four"
    assert _prefix("single", 0.4) == "single"
    assert verdict(0.05) == "clean" and verdict(0.95) == "contaminated" and verdict(0.5) == "inconclusive"
