"""task_arithmetic: base + lambda sum_i w_i (theta_i - base); its block kernel serves every task-vector
method (ties and dare trim the deltas first, ties and dare_ties elect signs)."""

from __future__ import annotations

from upstack.merge.blocks import Scratch
from upstack.merge.methods.dare import dare_keep_mask
from upstack.merge.spec import MethodSpec

SPEC = MethodSpec(True, {"weight": 1.0, "lambda": 1.0, "normalize": False}, ("weight",),
                  doc="base + lambda sum_i w_i (theta_i - base)")


def task_vector_block(recipe, spec: MethodSpec, xs, start: int, end: int, topks, seen_before, sc: Scratch):
    """base + lambda * mix of the (trimmed, weighted) task vectors for one block; xs = [base, models...].

    `recipe` is the tensor's TensorRecipe, `spec` its method's MethodSpec (which trim, whether signs
    are elected); `topks` are the ties top-k selections, `seen_before` their threshold-equal counts.
    """
    import torch

    base = sc.f32("base", xs[0])
    deltas = []
    for i, (x, w) in enumerate(zip(xs[1:], recipe.weights)):
        d = sc.f32(f"delta{i}", x).sub_(base)
        scale = 1.0
        if spec.trim == "magnitude" and topks[i].mode != "all":
            if topks[i].mode == "select":
                bits = torch.abs(d, out=sc.get("bits", d.numel())).view(torch.int32)
                d.mul_(topks[i].keep(bits, seen_before[i], sc))
            else:
                d.zero_()
        elif spec.trim == "random" and recipe.densities[i] < 1:
            d.mul_(dare_keep_mask(recipe.seeds[i], start, end, recipe.densities[i], sc))
            if recipe.rescale:
                scale = 1.0 / recipe.densities[i]
        if scale != 1.0:
            d.mul_(scale)
        deltas.append(d.mul_(w) if w != 1.0 else d)
    if spec.consensus:
        n = base.numel()
        total = sc.get("total", n).copy_(deltas[0])
        for d in deltas[1:]:
            total.add_(d)
        positive = torch.ge(total, 0, out=sc.get("positive", n, torch.bool))
        mixed = sc.get("mixed", n).zero_()
        divisor = sc.get("divisor", n).zero_() if recipe.normalize else None
        gt, lt = sc.get("gt", n, torch.bool), sc.get("lt", n, torch.bool)
        agree = sc.get("agree", n, torch.bool)
        agree_f = sc.get("agree_f", n)
        for d, w in zip(deltas, recipe.weights):
            torch.where(positive, torch.gt(d, 0, out=gt), torch.lt(d, 0, out=lt), out=agree)
            agree_f.copy_(agree)
            mixed.addcmul_(d, agree_f)
            if divisor is not None:
                divisor.add_(agree_f, alpha=w)
        if divisor is not None:
            divisor.masked_fill_(torch.eq(divisor, 0, out=gt), 1.0)
            mixed.div_(divisor)
    else:
        mixed = deltas[0]
        for d in deltas[1:]:
            mixed.add_(d)
        if recipe.normalize:
            mixed.div_(sum(recipe.weights))
    return base.add_(mixed, alpha=recipe.lam) if recipe.lam != 1.0 else base.add_(mixed)
