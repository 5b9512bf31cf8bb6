"""LoRA's CPU dropout (skip sampling) is a Bernoulli(p) dropout with torch's semantics, reproducible under a
seed and under gradient checkpointing; LoRA under bf16-mixed holds its frozen base in bf16, trains fp32
adapters and gives the loss of a plain PEFT + autocast loop."""

import json
import math

import pytest
from tiny import build_tiny_model

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_dropped_positions_are_bernoulli_p(p):
    from upstack.train.dropout import dropped_positions

    n = 400_000
    torch.manual_seed(1)
    pos = dropped_positions(n, p)
    assert pos.dtype == torch.int64 and pos.numel() == pos.unique().numel()
    assert int(pos.min()) >= 0 and int(pos.max()) < n and bool((pos[1:] > pos[:-1]).all())
    sd = math.sqrt(n * p * (1 - p))
    assert abs(pos.numel() - n * p) < 5 * sd                      # the count is Binomial(n, p)
    mask = torch.zeros(n)
    mask[pos] = 1
    both = float((mask[1:] * mask[:-1]).sum())                      # neighbours dropped independently
    assert abs(both - (n - 1) * p * p) < 5 * math.sqrt(n * p * p) + 5
    halves = mask.reshape(2, -1).sum(1)                              # no drift along the tensor
    assert abs(float(halves[0] - halves[1])) < 5 * sd   # the difference has variance n p (1 - p)
    torch.manual_seed(1)
    assert torch.equal(dropped_positions(n, p), pos)                 # the seed decides the mask


def test_skip_sampling_continues_past_a_short_draw(monkeypatch):
    """A draw of gaps that ends before n (about 1 in 10^9 calls) is continued, not cut short."""
    from upstack.train import dropout

    real = torch.Tensor.geometric_
    calls = []

    def short_first(t, p):
        calls.append(t.numel())
        real(t, p)
        if len(calls) == 1:
            t.fill_(1.0)   # k gaps of 1: ends at position k - 1 < n
        return t

    monkeypatch.setattr(torch.Tensor, "geometric_", short_first)
    pos = dropout.dropped_positions(10_000, 0.05)
    assert len(calls) >= 2
    k = calls[0]
    assert torch.equal(pos[:k], torch.arange(k))                   # the first draw's positions are kept
    assert int(pos.max()) < 10_000 and bool((pos[1:] > pos[:-1]).all())


def test_cpu_dropout_forward_and_backward_use_one_mask():
    from upstack.train.dropout import CpuDropout

    drop = CpuDropout(0.1)
    x = torch.randn(64, 48, dtype=torch.bfloat16, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    assert 0.8 < kept.float().mean() < 0.97
    assert torch.equal(y[kept], (x.detach() * (1 / 0.9))[kept])   # torch's scaling of what is kept
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, torch.where(kept, g * (1 / 0.9), torch.zeros_like(g)))
    drop.eval()
    assert torch.equal(drop(x), x)                                   # identity in eval mode
    assert torch.equal(CpuDropout(0.0).train()(x), x)


def test_masks_are_the_same_when_gradient_checkpointing_recomputes():
    """Checkpointing restores the RNG state, so the recomputed forward draws the same mask: the gradients
    equal those of the plain forward."""
    from torch.utils.checkpoint import checkpoint

    from upstack.train.dropout import CpuDropout

    lin = torch.nn.Linear(32, 32)
    drop = CpuDropout(0.2)
    x = torch.randn(16, 32)

    def f(t):
        return lin(drop(t)).tanh()

    grads = []
    for use_ckpt in (False, True):
        lin.zero_grad()
        torch.manual_seed(5)
        out = checkpoint(f, x, use_reentrant=False) if use_ckpt else f(x)
        out.sum().backward()
        grads.append(lin.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_tune_lora_layers_swaps_dropout_and_keeps_autocast_outputs():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from upstack.train.dropout import CpuDropout, tune_lora_layers

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():   # non-zero B so the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids).logits
        assert tune_lora_layers(model, autocast=True) == 14
        after = model(ids).logits
    assert torch.equal(before, after)   # no fp32 copy of each input: the same numbers under autocast
    model2 = get_peft_model(LlamaForCausalLM(base.config), LoraConfig(r=4, lora_dropout=0.05,
                                                                      target_modules="all-linear"))
    tune_lora_layers(model2, autocast=False)
    drops = [d for m in model2.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert len(drops) == 14 and all(isinstance(d, CpuDropout) and d.p == 0.05 for d in drops)


def test_bf16_mixed_lora_holds_a_bf16_base_and_equals_a_plain_autocast_loop(tmp_path, monkeypatch):
    """--lora --dtype bf16-mixed: the frozen base is loaded in bf16, adapters and modules_to_save train in
    fp32 under bf16 autocast; the loss curve equals a plain PEFT loop doing exactly that (1e-5)."""
    from test_train_lora import plain_peft_losses

    from upstack.cli import main

    model_dir = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2)
    rows = [{"instruction": f"Say {w} ({i})", "input": "", "output": f"{w} {w}."}
            for i, w in enumerate(["red", "blue", "green", "gold"] * 3)]
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    seen = {}
    import upstack.train.model as train_model

    def capture(model, cfg, path):
        model, info = apply_lora(model, cfg, path)
        seen.update({n: (p.dtype, p.requires_grad) for n, p in model.named_parameters()})
        return model, info

    apply_lora = train_model.apply_lora
    monkeypatch.setattr(train_model, "apply_lora", capture)
    assert main(["sft", str(model_dir), "--data", str(data), "--out", str(out), "-q", "--lora", "--lora-r", "4",
                 "--lora-dropout", "0", "--lora-modules-to-save", "lm_head", "--dtype", "bf16-mixed",
                 "--max-steps", "4", "--batch-size", "4", "--lr", "3e-3", "--lr-scheduler", "constant",
                 "--no-packing", "--max-length", "64", "--max-grad-norm", "0", "--no-tensorboard",
                 "--logging-steps", "1", "--seed", "0"]) == 0
    frozen = {d for n, (d, g) in seen.items() if not g}
    trained = {d for n, (d, g) in seen.items() if g}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert any("modules_to_save" in n and g for n, (d, g) in seen.items())
    ours = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]

    plain = plain_peft_losses(model_dir, data, steps=4, batch=4, dtype=torch.bfloat16, modules_to_save=["lm_head"])
    assert ours == pytest.approx(plain, abs=1e-5)
    assert plain[-1] < plain[0]
