"""linear / average: sum_i w_i theta_i / sum_i w_i (a plain weighted sum with normalize: false)."""

from __future__ import annotations

from upstack.merge.blocks import Scratch
from upstack.merge.spec import MethodSpec

SPEC = MethodSpec(False, {"weight": 1.0, "normalize": True}, ("weight",),
                  doc="sum_i w_i theta_i / sum_i w_i")


def affine_block(xs, weights, sc: Scratch):
    """sum_i c_i x_i with c = w / sum(w), as x_0 + sum_{i>0} c_i (x_i - x_0): identical inputs give back
    exactly x_0 (in any dtype), and the result never leaves the inputs' range by rounding."""
    total = sum(weights)
    x0 = sc.f32("x0", xs[0])
    if len(xs) == 1:
        return x0
    if len(xs) == 2:  # torch.lerp: x0 + c (x1 - x0) in one pass
        return x0.lerp_(sc.f32("tmp", xs[1]), weights[1] / total)
    acc = sc.f32("tmp", xs[1]).sub_(x0).mul_(weights[1] / total)
    for x, w in zip(xs[2:], weights[2:]):
        acc.add_(sc.f32("tmp2", x).sub_(x0), alpha=w / total)
    return x0.add_(acc)


def weighted_sum_block(xs, coeffs, sc: Scratch):
    acc = sc.f32("x0", xs[0]).mul_(coeffs[0])
    for x, c in zip(xs[1:], coeffs[1:]):
        acc.add_(sc.f32("tmp", x), alpha=c)
    return acc
