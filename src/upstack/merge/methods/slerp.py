"""slerp: spherical interpolation of two models (mergekit's formula and thresholds)."""

from __future__ import annotations

import math

from upstack.merge.blocks import Scratch
from upstack.merge.spec import REQUIRED, MethodSpec

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8

SPEC = MethodSpec(False, {"t": REQUIRED}, (), doc="spherical interpolation of two models")


def slerp_coefficients(dot: float, sq0: float, sq1: float, t: float, eps: float = SLERP_EPS,
                       dot_threshold: float = SLERP_DOT_THRESHOLD) -> tuple[float, float, bool]:
    """(s0, s1, is_slerp) so that slerp(a, b, t) = s0 a + s1 b, from <a, b>, |a|^2 and |b|^2.

    Directions are normalised (a vector with norm <= eps is left as it is, as mergekit does); when the
    cosine's magnitude exceeds dot_threshold the tensors are nearly colinear and the result is lerp.
    """
    n0, n1 = math.sqrt(max(sq0, 0.0)), math.sqrt(max(sq1, 0.0))
    cos = dot / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if not math.isfinite(cos) or abs(cos) > dot_threshold:
        return 1.0 - t, t, False
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta, True


def slerp_stats(xs, sc: Scratch) -> tuple[float, float, float]:
    import torch

    a, b = sc.f32("x0", xs[0]), sc.f32("tmp", xs[1])
    return float(torch.dot(a, b)), float(torch.dot(a, a)), float(torch.dot(b, b))
