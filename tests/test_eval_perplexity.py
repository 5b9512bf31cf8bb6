"""Sliding-window perplexity: exact against a direct computation, every token scored once, bad input."""

import json
import math

import pytest
from tiny import build_tiny_model

from upstack.errors import DataError
from upstack.evaluate.perplexity import perplexity, windows
from upstack.lm import load_for_inference

TEXT = ("Depth up-scaling stacks two copies of a model and drops the seam layers. " * 12).strip()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("ppl") / "tiny", "llama", num_hidden_layers=2, vocab_size=260))


@pytest.mark.parametrize("length, window, stride", [(10, 4, 2), (10, 4, 4), (3, 8, 4), (100, 32, 7), (33, 32, 31)])
def test_windows_score_every_token_once(length, window, stride):
    ids = list(range(length))
    scored = []
    for w, first in windows(ids, window, stride):
        assert len(w) <= window and first >= 1
        scored += w[first:]
    assert scored == ids[1:]


def _reference_nll(model, ids, window, stride):
    """The transformers guide's loop: labels -100 on context tokens, loss * target count."""
    import torch

    nll, count, prev_end = 0.0, 0, 0
    x = torch.tensor([ids])
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        trg = end - prev_end
        inp = x[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(inp, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * n
        count += n
        prev_end = end
        if end == len(ids):
            break
    return nll / count, count


def test_matches_direct_computation(tiny, tmp_path):
    model, tok = load_for_inference(tiny, device="cpu")
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    ids = tok(TEXT)["input_ids"]
    assert len(ids) > 256  # longer than the model's context: needs the window
    for window, stride in ((256, 128), (64, 64), (100, 30)):
        res = perplexity(model, f, tokenizer=tok, max_length=window, stride=stride, batch_size=3)
        assert res["stride"] == min(stride, window - 1)
        nll, count = _reference_nll(model, ids, window, res["stride"])
        assert res["tokens"] == count == len(ids) - 1
        assert res["nll"] == pytest.approx(nll, rel=1e-5)
        assert res["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
        assert res["bits_per_byte"] == pytest.approx(nll * count / math.log(2) / len(TEXT.encode()), rel=1e-5)


def test_jsonl_documents_and_batching_agree(tiny, tmp_path):
    docs = [TEXT[: 40 + 30 * i] for i in range(6)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    a = perplexity(tiny, f, batch_size=1, device="cpu")
    b = perplexity(tiny, f, batch_size=4, device="cpu")  # padded batches: same numbers
    assert a["documents"] == 6 and a["tokens"] == b["tokens"]
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-4)
    assert perplexity(tiny, f, device="cpu", limit=2)["documents"] == 2


def test_bad_input(tiny, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "hello there"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"d.jsonl: line 2: missing field 'text'"):
        perplexity(tiny, f, device="cpu")
    with pytest.raises(DataError, match="file not found"):
        perplexity(tiny, tmp_path / "none.txt", device="cpu")
    empty = tmp_path / "e.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="no text to score"):
        perplexity(tiny, empty, device="cpu")


def test_max_tokens_scores_a_prefix_and_stderr_is_over_windows(tiny, tmp_path):
    """`max_tokens` scores exactly the first N tokens (the same numbers as a file holding only them); the standard
    error is the ratio estimator's over the scored windows, and absent for one window."""
    model, tok = load_for_inference(tiny, device="cpu")
    f = tmp_path / "t.txt"
    f.write_text(TEXT)
    ids = tok(TEXT)["input_ids"]
    cut = perplexity(model, f, tokenizer=tok, max_length=32, stride=32, max_tokens=100)
    assert cut["tokens"] == 99 and cut["windows"] == 4  # 100 tokens, windows of 32 (stride 31)
    prefix = tmp_path / "p.txt"
    prefix.write_text(tok.decode(ids[:100]))
    assert tok(prefix.read_text())["input_ids"] == ids[:100]
    same = perplexity(model, prefix, tokenizer=tok, max_length=32, stride=32)
    assert cut["nll"] == pytest.approx(same["nll"], rel=1e-6)
    # the standard error by hand: per-window (summed NLL, tokens), ratio estimator, delta method
    import torch
    import torch.nn.functional as F
    sums = []
    for w, first in windows(ids[:100], 32, 31):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([w])).logits[0, :-1].float()
        nll = F.cross_entropy(logits, torch.tensor(w[1:]), reduction="none")[first - 1:]
        sums.append((float(nll.sum()), len(nll)))
    n, mean_nll = len(sums), sum(s for s, _ in sums) / sum(t for _, t in sums)
    var = sum((s - mean_nll * t) ** 2 for s, t in sums) / (n - 1)
    se = math.exp(mean_nll) * math.sqrt(var / n) / (sum(t for _, t in sums) / n)
    assert cut["perplexity_stderr"] == pytest.approx(se, rel=1e-4)
    one = perplexity(model, f, tokenizer=tok, max_length=256, max_tokens=100)
    assert one["windows"] == 1 and one["perplexity_stderr"] is None
    with pytest.raises(Exception, match="max_tokens must be at least 2"):
        perplexity(model, f, tokenizer=tok, max_tokens=1)
