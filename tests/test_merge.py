"""Merge methods as pure tensor functions, checked against their formulas computed independently here."""

import math

import pytest
import torch

from upstack import merge as M
from upstack.errors import ConfigError


def rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# -- independent reference formulas -----------------------------------------------------------------

def slerp_ref(a, b, t, threshold=0.9995):
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float((a64 / a64.norm()) @ (b64 / b64.norm()))
    if abs(cos) > threshold:
        out = (1 - t) * a64 + t * b64
    else:
        th = math.acos(cos)
        out = (math.sin((1 - t) * th) * a64 + math.sin(t * th) * b64) / math.sin(th)
    return out.reshape(a.shape)


def topk_mask(d, density):
    """Keep the int(density * n) largest |d|; equal magnitudes in index order (a stable sort)."""
    flat = d.flatten()
    k = int(density * flat.numel())
    idx = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    mask = torch.zeros_like(flat)
    mask[idx] = 1
    return mask.reshape(d.shape)


def elect(base, wdeltas, weights, normalize=True, lam=1.0):
    stacked = torch.stack(wdeltas)
    majority = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = (torch.sign(stacked) == majority).double()
    mixed = (stacked * agree).sum(0)
    if normalize:
        div = (torch.tensor(weights, dtype=torch.float64).reshape(-1, *[1] * base.dim()) * agree).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return base + lam * mixed


def ties_ref(base, xs, weights, density, lam=1.0, normalize=True):
    base = base.double()
    wd = [w * (x.double() - base) * topk_mask(x.double() - base, density) for x, w in zip(xs, weights)]
    return elect(base, wd, weights, normalize, lam)


def dare_ref(base, xs, weights, density, seed, name, lam=1.0, ties=False, normalize=None):
    base = base.double()
    wd = []
    for i, (x, w) in enumerate(zip(xs, weights)):
        d = (x.double() - base).flatten()
        s = M.dare_seed(seed, name, i)
        keep = torch.cat([M.dare_keep_mask(s, a, min(d.numel(), a + M.BLOCK), density)
                          for a in range(0, d.numel(), M.BLOCK)])
        wd.append((w * d * keep / density).reshape(base.shape))
    if ties:
        return elect(base, wd, weights, True if normalize is None else normalize, lam)
    return base + lam * sum(wd)


# -- linear ------------------------------------------------------------------------------------------

def test_linear_matches_formula():
    xs = [rand(33, 17, seed=i) for i in range(3)]
    w = [0.5, 0.3, 0.7]
    expect = sum(wi * x.double() for wi, x in zip(w, xs)) / sum(w)
    assert torch.allclose(M.linear(xs, w).double(), expect, atol=1e-6)
    assert torch.allclose(M.linear(xs).double(), sum(x.double() for x in xs) / 3, atol=1e-6)
    plain = sum(wi * x.double() for wi, x in zip(w, xs))
    assert torch.allclose(M.linear(xs, w, normalize=False).double(), plain, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_of_identical_tensors_is_exact(dtype):
    x = rand(40, 9, dtype=dtype)
    out = M.linear([x, x.clone(), x.clone()], [0.3, 0.2, 0.5])
    assert torch.equal(out.to(dtype), x)


def test_linear_rejects_zero_weight_sum():
    with pytest.raises(ValueError):
        M.linear([rand(4), rand(4, seed=1)], [1.0, -1.0])


# -- slerp -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_formula(t):
    a, b = rand(64, 8), rand(64, 8, seed=1)
    assert torch.allclose(M.slerp(a, b, t).double(), slerp_ref(a, b, t), atol=1e-5)


def test_slerp_end_points_are_exact():
    a, b = rand(50, 3), rand(50, 3, seed=1)
    assert torch.equal(M.slerp(a, b, 0.0), a)
    assert torch.equal(M.slerp(a, b, 1.0), b)
    ab, bb = a.bfloat16(), b.bfloat16()
    assert torch.equal(M.slerp(ab, bb, 0.0).bfloat16(), ab)
    assert torch.equal(M.slerp(ab, bb, 1.0).bfloat16(), bb)


def test_slerp_of_colinear_tensors_is_lerp():
    a = rand(100)
    for b in (2.5 * a, -0.5 * a, a + 1e-6 * rand(100, seed=1)):
        assert torch.allclose(M.slerp(a, b, 0.3), 0.7 * a + 0.3 * b, atol=1e-6)


def test_slerp_keeps_norm_between_orthogonal_unit_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = M.slerp(a, b, 0.5)
    assert torch.allclose(out, torch.tensor([math.sqrt(0.5)] * 2))


# -- task arithmetic, ties, dare ---------------------------------------------------------------------

def test_task_arithmetic_matches_formula():
    base, xs = rand(20, 11, seed=9), [rand(20, 11, seed=i) for i in range(2)]
    w, lam = [0.6, 0.3], 0.8
    expect = base.double() + lam * sum(wi * (x.double() - base.double()) for wi, x in zip(w, xs))
    assert torch.allclose(M.task_arithmetic(base, xs, w, lam).double(), expect, atol=1e-6)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9, 1.0])
def test_ties_matches_formula(density):
    base, xs = rand(30, 20, seed=9), [rand(30, 20, seed=i) for i in range(3)]
    w = [1.0, 0.5, 0.8]
    out = M.ties(base, xs, w, density, lam=0.9)
    assert torch.allclose(out.double(), ties_ref(base, xs, w, density, lam=0.9), atol=1e-6)
    plain = M.ties(base, xs, w, density, normalize=False)
    assert torch.allclose(plain.double(), ties_ref(base, xs, w, density, normalize=False), atol=1e-6)


def test_ties_top_k_is_exact_with_many_equal_magnitudes():
    # bf16 deltas take few distinct values, so the k-th magnitude is shared by many entries: the
    # streamed radix select must keep exactly k of them, picking equal ones in index order.
    base = torch.zeros(3000)
    x = (rand(3000, seed=1) * 4).round() / 4  # magnitudes in {0, .25, .5, ...}: heavy ties
    out = M.ties(base, [x], [1.0], 0.37)
    mask = topk_mask(x, 0.37)
    assert int((out != 0).sum()) == int((x * mask != 0).sum())
    assert torch.equal(out, x * mask)


def test_ties_with_one_model_and_full_density_is_task_arithmetic():
    base, x = rand(40, 5, seed=3), rand(40, 5, seed=4)
    assert torch.equal(M.ties(base, [x], density=1.0), M.task_arithmetic(base, [x]))
    assert torch.equal(M.ties(base, [x], [0.7], 1.0, lam=0.5, normalize=False),
                       M.task_arithmetic(base, [x], [0.7], lam=0.5))


def test_dare_matches_formula_and_keeps_about_density():
    base, xs = rand(64, 64, seed=9), [rand(64, 64, seed=i) for i in range(2)]
    w = [0.7, 0.4]
    out = M.dare(base, xs, w, 0.3, lam=1.2, seed=5, name="t")
    assert torch.allclose(out.double(), dare_ref(base, xs, w, 0.3, 5, "t", lam=1.2), atol=1e-5)
    out_t = M.dare(base, xs, w, 0.3, seed=5, name="t", ties=True)
    assert torch.allclose(out_t.double(), dare_ref(base, xs, w, 0.3, 5, "t", ties=True), atol=1e-5)
    kept = (M.dare(base, xs[:1], [1.0], 0.3, seed=5, name="t") != base).float().mean()
    assert 0.27 < float(kept) < 0.33


def test_dare_is_seeded_and_reduces_to_its_counterpart_at_full_density():
    base, xs = rand(50, 7, seed=9), [rand(50, 7, seed=i) for i in range(2)]
    one = M.dare(base, xs, density=0.5, seed=1, name="w")
    assert torch.equal(one, M.dare(base, xs, density=0.5, seed=1, name="w"))
    assert not torch.equal(one, M.dare(base, xs, density=0.5, seed=2, name="w"))
    assert not torch.equal(one, M.dare(base, xs, density=0.5, seed=1, name="other"))
    assert torch.equal(M.dare(base, xs, density=1.0, seed=1), M.task_arithmetic(base, xs))
    assert torch.equal(M.dare(base, xs, density=1.0, seed=1, ties=True), M.ties(base, xs, density=1.0))


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_linear", "dare_ties"])
def test_chunking_does_not_change_the_bytes(monkeypatch, method):
    monkeypatch.setattr(M.blocks, "BLOCK", 256)
    n = 5000
    base, xs = rand(n, seed=9), [rand(n, seed=i) for i in range(2)]
    recipe = {"linear": M.TensorRecipe("linear", weights=[0.3, 0.7]),
              "slerp": M.TensorRecipe("slerp", t=0.3)}.get(method) or M.TensorRecipe(
        method, weights=[1.0, 0.6], densities=[0.4, 0.6], seeds=[11, 12],
        normalize=M.METHODS[method].defaults["normalize"])
    inputs = xs if method in ("linear", "slerp") else [base, *xs]
    results = []
    for chunk in (256, 1024, 256 * 20):
        parts = M.compute_chunks(recipe, lambda a, b, sc: [x[a:b] for x in inputs], n, chunk, torch.bfloat16)
        results.append(torch.cat(list(parts)))
    assert all(torch.equal(results[0], r) for r in results[1:])


# -- parameter settings ------------------------------------------------------------------------------

def test_gradient_interpolates_across_depth():
    g = M.check_setting("t", [0, 0.5, 1], "t")
    assert [M.evaluate_setting(g, "x", d) for d in (0, 0.25, 0.5, 0.75, 1)] == [0, 0.25, 0.5, 0.75, 1]
    g = M.check_setting("t", [0.0, 1.0, 0.0], "t")
    assert M.evaluate_setting(g, "x", 0.25) == pytest.approx(0.5)


def test_filters_pick_the_first_matching_condition():
    setting = M.check_setting("t", [{"filter": "self_attn", "value": [0, 1]},
                                    {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}], "t")
    assert M.evaluate_setting(setting, "model.layers.3.self_attn.q_proj.weight", 0.25) == 0.25
    assert M.evaluate_setting(setting, "model.layers.3.mlp.up_proj.weight", 0.25) == 0.75
    assert M.evaluate_setting(setting, "model.norm.weight", 1.0) == 0.5
    only = M.check_setting("t", {"filter": "mlp", "value": 0.2}, "t")
    assert M.evaluate_setting(only, "model.norm.weight", 1.0) is None


def test_tensor_depth():
    assert M.tensor_depth("model.layers.0.mlp.up_proj.weight", 5) == 0
    assert M.tensor_depth("model.layers.4.mlp.up_proj.weight", 5) == 1
    assert M.tensor_depth("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert M.tensor_depth("model.embed_tokens.weight", 5) == 0
    assert M.tensor_depth("lm_head.weight", 5) == 1
    assert M.tensor_depth("model.norm.weight", 5) == 1


@pytest.mark.parametrize("name,setting,msg", [
    ("t", 1.5, "t=1.5 is out of range"),
    ("t", [0, 1.2], "t=1.2 is out of range"),
    ("t", [{"filter": "mlp", "value": -0.1}], "t=-0.1 is out of range"),
    ("density", 0, "density=0 is out of range"),
    ("density", 1.01, "out of range"),
    ("weight", "heavy", "must be a finite number"),
    ("normalize", 1, "true or false"),
    ("t", [{"filter": "mlp", "valeu": 0.5}], "unknown key(s) valeu"),
    ("t", [{"filter": "mlp"}], "missing 'value'"),
    ("t", [], "empty list"),
])
def test_bad_settings_are_refused(name, setting, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        M.check_setting(name, setting, "parameters")


def test_slerp_coefficients():
    s0, s1, is_slerp = M.slerp_coefficients(0.0, 1.0, 1.0, 0.5)
    assert is_slerp and s0 == pytest.approx(math.sqrt(0.5)) and s1 == pytest.approx(math.sqrt(0.5))
    assert M.slerp_coefficients(1.0, 1.0, 1.0, 0.3) == (0.7, 0.3, False)
    assert M.slerp_coefficients(0.2, 1.0, 1.0, 0.0)[:2] == (1.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_half_precision_lerp_rounds_the_fp32_result(dtype):
    # upstack merge averages two bf16/fp16 models with torch.lerp in that dtype, relying on torch
    # computing it in fp32 and rounding once: check that on vectorised and tail paths
    for scale in (0.02, 30.0):
        a, b = (rand(1_000_003, seed=1) * scale).to(dtype), (rand(1_000_003, seed=2) * scale).to(dtype)
        for w in (0.5, 0.4, 0.6, 1 / 3):
            assert torch.equal(torch.lerp(a, b, w), torch.lerp(a.float(), b.float(), w).to(dtype))
