"""LoRA's CPU dropout (skip sampling) is a Bernoulli(p) dropout with torch's semantics, reproducible under a
seed and under gradient checkpointing; the fused adapter branch (LoraBranch) gives PEFT's loss and gradients
(fp32: equal; bf16 autocast: as close to fp32 as PEFT's); LoRA under bf16-mixed holds its frozen base in
bf16, trains fp32 adapters and gives the loss of a plain PEFT + autocast loop."""

import json
import math

import pytest
from tiny import build_tiny_model

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_dropped_positions_are_bernoulli_p(p):
    from upstack.train.lora_cpu import dropped_positions

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


def test_gaps_are_geometric_p():
    """The gaps between drops are Geometric(p) on {1, 2, ...}: P(gap > k) = (1 - p)^k."""
    from upstack.train.lora_cpu import _gaps

    n, p = 200_000, 0.05
    torch.manual_seed(2)
    g = _gaps(n, p)
    assert g.dtype == torch.float64 and float(g.min()) >= 1 and bool((g == g.floor()).all())
    for k in (1, 5, 20, 60):
        q = (1 - p) ** k
        assert abs(float((g > k).double().mean()) - q) < 5 * math.sqrt(q * (1 - q) / n)
    assert abs(float(g.mean()) - 1 / p) < 5 * math.sqrt((1 - p) / p**2 / n)


def test_skip_sampling_continues_past_a_short_draw(monkeypatch):
    """A draw of gaps that ends before n (about 1 in 10^9 calls) is continued, not cut short."""
    from upstack.train import lora_cpu

    real = lora_cpu._gaps
    calls = []

    def short_first(k, p):
        calls.append(k)
        t = real(k, p)
        return t.fill_(1.0) if len(calls) == 1 else t   # k gaps of 1: ends at position k - 1 < n

    monkeypatch.setattr(lora_cpu, "_gaps", short_first)
    pos = lora_cpu.dropped_positions(10_000, 0.05)
    assert len(calls) >= 2
    k = calls[0]
    assert torch.equal(pos[:k], torch.arange(k))                   # the first draw's positions are kept
    assert int(pos.max()) < 10_000 and bool((pos[1:] > pos[:-1]).all())


def test_cpu_dropout_forward_and_backward_use_one_mask():
    from upstack.train.lora_cpu import CpuDropout

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


def test_cpu_dropout_obeys_what_switches_nn_dropout_off():
    """DPO turns dropout off by setting every nn.Dropout's p to 0 (lm.disable_dropout, as TRL's
    disable_dropout_in_model does): CpuDropout is an nn.Dropout, so it is switched off with them and then
    passes its input through in training mode, as the nn.Dropout it replaces does."""
    from trl.trainer.utils import disable_dropout_in_model

    from upstack.lm import disable_dropout
    from upstack.train.lora_cpu import CpuDropout

    x = torch.randn(64, 48)
    for switch in (disable_dropout, disable_dropout_in_model):
        ours, library = CpuDropout(0.3).train(), torch.nn.Dropout(0.3).train()
        switch(torch.nn.Sequential(ours, library))
        assert ours.p == library.p == 0
        assert torch.equal(ours(x), x) and torch.equal(library(x), x)


def test_masks_are_the_same_when_gradient_checkpointing_recomputes():
    """Checkpointing restores the RNG state, so the recomputed forward draws the same mask: the gradients
    equal those of the plain forward."""
    from torch.utils.checkpoint import checkpoint

    from upstack.train.lora_cpu import CpuDropout

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


def _peft_llama(dtype=torch.float32, dropout=0.0, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4)).to(dtype)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=dropout, target_modules="all-linear", **lora))
    for name, p in model.named_parameters():   # non-zero B so the adapters change the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
        if "lora_" in name:
            p.data = p.data.float()             # adapters train in fp32, as under --dtype bf16-mixed
    return model


def _loss_and_grads(model, ids, autocast=False, seed=7):
    model.zero_grad()
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach().float(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _peft_path(model, autocast):
    """`model` as tune_lora_layers leaves it but on PEFT's own forward (its CpuDropout, its casts)."""
    import copy

    from upstack.train.lora_cpu import tune_lora_layers

    other = copy.deepcopy(model)
    tune_lora_layers(other, autocast=autocast)
    for m in other.modules():
        vars(m).pop("forward", None)
    return other


def test_tune_lora_layers_swaps_dropout_and_binds_the_branch():
    import copy

    from upstack.train.lora_cpu import CpuDropout, tune_lora_layers

    model = _peft_llama(dropout=0.05)
    assert tune_lora_layers(model, autocast=True) == 14
    drops = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert len(drops) == 14 and all(isinstance(d, CpuDropout) and d.p == 0.05 for d in drops)
    bound = [m for m in model.modules() if "forward" in vars(m)]
    assert len(bound) == 14 and all(not m.cast_input_dtype_enabled for m in bound)
    state = [(m, m.forward, dict(m.lora_dropout)) for m in bound]
    assert tune_lora_layers(model, autocast=True) == 0             # a second call changes nothing
    assert all(m.forward is f and dict(m.lora_dropout) == d for m, f, d in state)   # the same objects
    twin = copy.deepcopy(model)                                    # a deep copy runs its own layers
    assert all(m.forward.__self__ is m for m in twin.modules() if "forward" in vars(m))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_branch_equals_peft_in_fp32(dropout):
    """fp32: the branch's loss and every gradient equal PEFT's forward with the same dropout mask (the same
    seed draws the same positions); in eval mode the outputs are equal too, and a checkpointed forward gives
    the same gradients."""
    from upstack.train.lora_cpu import tune_lora_layers
    from upstack.train.model import _enable_gradient_checkpointing

    model = _peft_llama(dropout=dropout)
    tune_lora_layers(model, autocast=False)
    peft = _peft_path(model, autocast=False)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    model.train(), peft.train()
    loss, grads = _loss_and_grads(model, ids)
    ref_loss, ref_grads = _loss_and_grads(peft, ids)
    assert len(grads) == 28 and grads.keys() == ref_grads.keys()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    model.eval(), peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, peft(ids).logits, rtol=1e-5, atol=1e-6)
    model.train()
    _enable_gradient_checkpointing(model)
    ck_loss, ck_grads = _loss_and_grads(model, ids)
    assert float(ck_loss) == float(loss)
    for name, g in ck_grads.items():
        torch.testing.assert_close(g, grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_branch_under_bf16_autocast_is_as_accurate_as_peft():
    """bf16 base under bf16 autocast: the branch rounds differently from PEFT (one addmm instead of a scaled
    product and an addition), so compare both with the fp32 computation of the same model: the branch's
    loss and gradients are no further from it than PEFT's (within 1.5x and a bf16 ulp)."""
    import copy

    from upstack.train.lora_cpu import tune_lora_layers

    model = _peft_llama(dtype=torch.bfloat16)
    exact = copy.deepcopy(model).float()
    tune_lora_layers(model, autocast=True)
    peft = _peft_path(model, autocast=True)
    ids = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(2))
    ref_loss, ref = _loss_and_grads(exact.train(), ids)
    results = {name: _loss_and_grads(m.train(), ids, autocast=True) for name, m in (("branch", model), ("peft", peft))}

    def errors(name):
        loss, grads = results[name]
        return abs(float(loss - ref_loss)), [float((grads[k] - ref[k]).norm() / ref[k].norm()) for k in ref]

    (branch_loss, branch), (peft_loss, peft_err) = errors("branch"), errors("peft")
    assert branch_loss <= 1.5 * peft_loss + 2**-8 * float(ref_loss)
    assert sum(branch) <= 1.5 * sum(peft_err) and max(branch) < 0.05
    assert sum(peft_err) > 0            # the comparison is not vacuous: bf16 does round


def test_lora_branch_leaves_other_cases_to_peft():
    """DoRA, a disabled adapter and a merged adapter take PEFT's own forward: bit-equal outputs."""
    import copy

    from upstack.train.lora_cpu import tune_lora_layers

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(3))
    dora = _peft_llama(use_dora=True).eval()
    peft = _peft_path(dora, autocast=False)
    tune_lora_layers(dora, autocast=False)
    with torch.no_grad():
        assert torch.equal(dora(ids).logits, peft(ids).logits)
    model = _peft_llama().eval()
    tune_lora_layers(model, autocast=False)
    with torch.no_grad():
        with model.disable_adapter():
            off = model(ids).logits
        assert torch.equal(off, copy.deepcopy(model).unload()(ids).logits)   # the bare base model
        on = model(ids).logits
        assert not torch.allclose(on, off)
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, on, rtol=1e-4, atol=1e-5)


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
    # step 0 (B = 0: the adapters add nothing yet) is the same computation; after it upstack's LoraBranch
    # rounds its bf16 sum once where PEFT rounds twice (test_lora_branch_under_bf16_autocast_is_as_accurate...)
    assert ours[0] == pytest.approx(plain[0], abs=1e-5)
    assert ours == pytest.approx(plain, abs=1e-3)
    assert plain[-1] < plain[0]


def test_lora_branch_on_a_4bit_base_matches_peft(tmp_path):
    """QLoRA: the 4-bit layers take the branch too (the base returns fp32 under autocast; the bf16 adapter
    product is added to it as PEFT adds it): loss and gradients equal PEFT's own forward within bf16
    rounding, and the 4-bit weights are untouched."""
    pytest.importorskip("bitsandbytes")

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from upstack.train.lora_cpu import tune_lora_layers

    path = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    peft = _peft_path(model, autocast=True)
    tune_lora_layers(model, autocast=True)
    bound = [m for m in model.modules() if "forward" in vars(m)]
    assert len(bound) == 14 and all(type(m).__name__ == "Linear4bit" for m in bound)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    loss, grads = _loss_and_grads(model.train(), ids, autocast=True)
    ref_loss, ref = _loss_and_grads(peft.train(), ids, autocast=True)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-3)
    assert grads.keys() == ref.keys() and len(grads) == 28
    for name, g in grads.items():
        assert float((g - ref[name]).norm()) <= 0.03 * float(ref[name].norm()) + 1e-8, name
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)
