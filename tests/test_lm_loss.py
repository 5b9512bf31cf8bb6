"""The memory-lean loss: the output head applied a chunk of positions at a time gives the plain loss's values
and gradients; models whose logits are not the head's output (soft-capping) keep the plain path."""

import pytest
from tiny import build_tiny_model

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(vocab, rows=3, width=17, seed=0):
    from upstack.lm import collate_segments

    g = torch.Generator().manual_seed(seed)
    segs = []
    for r in range(rows):
        n = width - r * 3
        ids = torch.randint(4, vocab, (n,), generator=g).tolist()
        mask = [0] * 4 + [1] * (n - 4)  # a prompt of 4 tokens without labels
        segs.append([(ids, mask)])
    return collate_segments(segs, pad_id=3, reset_positions=False)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen2", True)])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(tmp_path, model_type, tied):
    from transformers import AutoModelForCausalLM

    from upstack.lm import loss_chunk_positions, token_nll

    path = build_tiny_model(tmp_path / "m", model_type, num_hidden_layers=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = _batch(model.config.vocab_size)
    vocab = model.get_output_embeddings().out_features
    small = 4 * vocab * 5  # five positions per chunk

    assert loss_chunk_positions(model, batch) is None  # a tiny batch takes the one-call path by default
    assert loss_chunk_positions(model, batch, small) == 5
    plain, labels = token_nll(model, batch)
    plain.sum().backward()
    want = _grads(model)
    model.zero_grad()
    chunked, labels2 = token_nll(model, batch, small)
    chunked.sum().backward()
    got = _grads(model)
    assert torch.equal(labels, labels2)
    assert torch.allclose(chunked, plain, atol=1e-6, rtol=1e-6)
    assert (plain[labels == -100] == 0).all() and (plain[labels != -100] > 0).all()
    assert want.keys() == got.keys() and len(got) > 10
    for n in want:
        assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), n
    # the head is restored after the chunked call
    assert "forward" not in vars(model.get_output_embeddings())


def test_soft_capped_logits_keep_the_plain_path(tmp_path):
    from transformers import AutoModelForCausalLM

    from upstack.lm import loss_chunk_positions

    path = build_tiny_model(tmp_path / "g", "gemma2", num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert loss_chunk_positions(model, _batch(model.config.vocab_size), chunk_bytes=16) is None


def test_loss_chunk_size_from_the_environment(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from upstack.errors import ConfigError
    from upstack.lm import LOSS_CHUNK_BYTES, loss_chunk_bytes, loss_chunk_positions

    path = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = _batch(model.config.vocab_size)
    vocab = model.get_output_embeddings().out_features
    assert loss_chunk_bytes() == LOSS_CHUNK_BYTES == 256 << 20
    monkeypatch.setenv("UPSTACK_LOSS_CHUNK_MB", str(4 * vocab * 5 / 2**20))
    assert loss_chunk_positions(model, batch) == 5
    for bad in ("0", "-1", "lots", "inf", "nan"):
        monkeypatch.setenv("UPSTACK_LOSS_CHUNK_MB", bad)
        with pytest.raises(ConfigError, match="UPSTACK_LOSS_CHUNK_MB"):
            loss_chunk_bytes()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scored_logits_equal_the_models_own(tmp_path, dtype):
    """forward_scored applies the head to the scored positions flattened into one matrix: the numbers of
    the model's own logits_to_keep forward (which heads a non-contiguous slice), and the head restored."""
    from transformers import AutoModelForCausalLM

    from upstack.lm import forward_scored

    path = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    batch = _batch(model.config.vocab_size)
    batch["logits_from"] = 4
    with torch.no_grad():
        logits, labels = forward_scored(model, batch)
        own = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    logits_to_keep=batch["input_ids"].shape[1] - 4).logits
    assert logits.shape == own.shape and torch.equal(labels, batch["labels"][:, 4:])
    torch.testing.assert_close(logits, own, rtol=0, atol=0)
    assert "forward" not in vars(model.get_output_embeddings())
