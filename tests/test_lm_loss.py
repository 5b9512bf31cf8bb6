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


def _plain_nll(model, batch):
    """The reference: the model's logits over the scored positions and F.cross_entropy."""
    import torch.nn.functional as F

    from upstack.lm import forward_scored

    logits, labels = forward_scored(model, batch)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
    return nll.view(labels.shape), labels


@pytest.mark.parametrize("model_type,tied", [("llama", False), ("qwen2", True)])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(tmp_path, model_type, tied):
    from transformers import AutoModelForCausalLM

    from upstack.lm import loss_chunk_positions, token_nll

    path = build_tiny_model(tmp_path / "m", model_type, num_hidden_layers=2, tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = _batch(model.config.vocab_size)
    batch["logits_from"] = 4
    vocab = model.get_output_embeddings().out_features
    small = 4 * vocab * 5  # five positions per chunk
    positions = 3 * (17 - 4)

    assert loss_chunk_positions(model, batch) is None  # a tiny batch takes the one-call path by default
    assert loss_chunk_positions(model, batch, small) == 5
    assert loss_chunk_positions(model, batch, 4 * vocab * (positions - 1)) == positions - 1  # 2 chunks
    weights = torch.rand(3, 17 - 4)  # an uneven upstream gradient, as DPO's per-row terms give
    plain, labels = _plain_nll(model, batch)
    (plain * weights).sum().backward()
    want = _grads(model)
    for chunk in (small, 4 * vocab * (positions - 1)):
        model.zero_grad()
        chunked, labels2 = token_nll(model, batch, chunk)
        (chunked * weights).sum().backward()
        got = _grads(model)
        assert torch.equal(labels, labels2)
        assert torch.allclose(chunked, plain, atol=1e-6, rtol=1e-6)
        assert (chunked[labels == -100] == 0).all() and (chunked[labels != -100] > 0).all()
        assert want.keys() == got.keys() and len(got) > 10
        for n in want:
            assert torch.allclose(got[n], want[n], atol=1e-6, rtol=1e-4), n
    # the head is restored after the chunked call
    assert "forward" not in vars(model.get_output_embeddings())


def test_chunked_loss_under_bf16_autocast_matches_the_plain_path(tmp_path):
    """fp32 master weights under bf16 autocast (the trainer's bf16-mixed): the head runs in bf16 and the
    log-softmax in fp32, as autocast runs F.linear + F.cross_entropy. The gradients round differently (the
    softmax is recomputed, not read back; the head's gradient is summed over chunks in fp32), so both are
    compared with the fp32 computation: the chunked loss is no less accurate than the plain one."""
    from transformers import AutoModelForCausalLM

    from upstack.lm import token_nll

    path = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = _batch(model.config.vocab_size)
    small = 4 * model.get_output_embeddings().out_features * 7
    results = []
    for mixed, fn in ((False, _plain_nll), (True, _plain_nll), (True, lambda m, b: token_nll(m, b, small))):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            nll, labels = fn(model, batch)
        nll.sum().backward()
        results.append((nll.detach(), _grads(model)))
    (exact, ref), (plain, want), (chunked, got) = results
    assert chunked.dtype == plain.dtype == torch.float32
    # the same bf16 logits; only the order of the fp32 sums differs
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert want.keys() == got.keys() and len(got) > 10
    for n in want:
        assert got[n].dtype == torch.float32
        assert rel(got[n], want[n]) < 0.01, n                      # measured: at most 0.004
        assert rel(got[n], ref[n]) <= 1.1 * rel(want[n], ref[n]) + 1e-3, n
    mean = sum(rel(got[n], ref[n]) for n in got) / len(got)
    assert mean <= 1.05 * sum(rel(want[n], ref[n]) for n in want) / len(want)  # measured: 0.00742 vs 0.00740


def test_head_gradient_off_cpu_is_a_compute_dtype_product_summed_in_fp32():
    """The head's gradient under bf16 autocast, chunked: on CPU (the default there) each chunk's part is
    an fp32 product; on other devices (forced here on CPU) a bf16 product, as autocast's F.linear computes
    the head's gradient, summed over the chunks in fp32. Against float64, the off-CPU path is about as
    accurate as the plain (unchunked) autocast path and the CPU path; the CPU default is unchanged; the
    hidden states' gradient is the same on both paths."""
    import torch.nn.functional as F

    from upstack.lm import _head_nll

    g = torch.Generator().manual_seed(0)
    n, h, v = 96, 64, 700
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::7] = -100
    upstream = torch.rand(n, generator=g)

    def grads(fn, dtype=torch.float32, autocast=True):
        x, w = (t.to(dtype, copy=True).requires_grad_() for t in (hidden, weight))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            (fn(x, w) * upstream.to(dtype)).sum().backward()
        return x.grad, w.grad

    def plain(x, w):
        return F.cross_entropy(F.linear(x, w).float(), labels, ignore_index=-100, reduction="none")

    _, exact = grads(plain, torch.float64, autocast=False)
    _, w_plain = grads(plain)
    x_cpu, w_cpu = grads(lambda x, w: _head_nll(x, w, None, labels, 8))                       # 12 chunks
    x_fp32, w_fp32 = grads(lambda x, w: _head_nll(x, w, None, labels, 8, fp32_head_grad=True))
    x_dev, w_dev = grads(lambda x, w: _head_nll(x, w, None, labels, 8, fp32_head_grad=False))

    def err(w):
        return float((w.double() - exact).norm() / exact.norm())

    assert torch.equal(w_cpu, w_fp32) and torch.equal(x_cpu, x_fp32)   # the CPU default: fp32 products
    assert torch.equal(x_dev, x_cpu) and not torch.equal(w_dev, w_cpu)  # only the head's gradient differs
    assert w_dev.dtype == torch.float32
    assert err(w_dev) < 0.01 and err(w_plain) < 0.01
    assert err(w_dev) <= 1.25 * err(w_plain), (err(w_dev), err(w_plain), err(w_cpu))   # measured: 0.99-1.01x
    assert err(w_cpu) <= 1.25 * err(w_plain), (err(w_dev), err(w_plain), err(w_cpu))   # measured: 0.80-0.89x


class _CountMatmuls:
    """Counts the matrix products torch runs inside the block (aten mm / addmm / bmm / matmul, in place or not)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        counter.n = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket.__name__.rstrip("_") in ("mm", "addmm", "bmm", "matmul", "baddbmm"):
                    counter.n += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_head_nll_with_a_bias_and_a_frozen_head():
    """The head function alone: bias gradients, positions without labels, and a frozen head (LoRA), whose
    weight gets no gradient computed."""
    import torch.nn.functional as F

    from upstack.lm import _head_nll

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(13, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(13, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (11,), generator=g)
    labels[[0, 5]] = -100
    upstream = torch.rand(11, generator=g, dtype=torch.float64)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=-100, reduction="none")
    for step in (1, 4, 11):
        args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = _head_nll(*args, labels, step)
        assert torch.allclose(out, ref.float(), atol=1e-5) and (out[[0, 5]] == 0).all()
        x = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        (F.cross_entropy(F.linear(*x), labels, ignore_index=-100, reduction="none") * upstream).sum().backward()
        (out * upstream).sum().backward()
        for mine, theirs in zip(args, x):
            assert torch.allclose(mine.grad, theirs.grad, atol=1e-5), step
    # A frozen head: its gradient is not computed at all (not computed and dropped). The backward pass of
    # 4 chunks (11 positions, 3 at a time) recomputes each chunk's logits and its hidden gradient (2 matrix
    # products a chunk); a trainable head adds its own gradient (a third).
    for trainable, products in ((True, 3 * 4), (False, 2 * 4)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(trainable)
        loss = _head_nll(h, w, None, labels, 3).sum()
        with _CountMatmuls() as count:
            loss.backward()
        assert count.n == products, (trainable, count.n)
        assert h.grad is not None and (w.grad is not None) == trainable


def test_soft_capped_logits_keep_the_plain_path(tmp_path):
    from transformers import AutoModelForCausalLM

    from upstack.lm import loss_chunk_positions

    path = build_tiny_model(tmp_path / "g", "gemma2", num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert loss_chunk_positions(model, _batch(model.config.vocab_size), chunk_bytes=16) is None


def test_loss_chunk_size_from_the_environment(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from upstack.errors import ConfigError
    from upstack.lm import LOSS_CHUNK_BYTES, LOSS_CHUNK_BYTES_CPU, loss_chunk_bytes, loss_chunk_positions

    path = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=1)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = _batch(model.config.vocab_size)
    vocab = model.get_output_embeddings().out_features
    assert loss_chunk_bytes() == loss_chunk_bytes("cuda") == LOSS_CHUNK_BYTES == 256 << 20
    assert loss_chunk_bytes("cpu") == LOSS_CHUNK_BYTES_CPU == 16 << 20
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
