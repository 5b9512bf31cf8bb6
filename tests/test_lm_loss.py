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
