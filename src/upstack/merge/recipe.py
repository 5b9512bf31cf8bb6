"""The method and parameters of one output tensor, resolved."""

from __future__ import annotations

import dataclasses

from upstack.merge.methods import METHODS
from upstack.merge.methods.slerp import SLERP_DOT_THRESHOLD, SLERP_EPS


@dataclasses.dataclass
class TensorRecipe:
    """How one output tensor is computed: the method and its parameters, resolved for that tensor.

    Inputs are ordered: linear -> the models; slerp -> [t=0 end, t=1 end]; task-vector methods ->
    [base, model 1, ...] (weights, densities and seeds are for the models, not the base).
    """

    method: str
    weights: list[float] = dataclasses.field(default_factory=list)
    t: float = 0.5
    densities: list[float] = dataclasses.field(default_factory=list)
    lam: float = 1.0
    normalize: bool = True
    rescale: bool = True
    seeds: list[int] = dataclasses.field(default_factory=list)
    eps: float = SLERP_EPS
    dot_threshold: float = SLERP_DOT_THRESHOLD

    def describe(self) -> str:
        def fmt(xs):
            return "[" + ", ".join(f"{x:g}" for x in xs) + "]"
        spec = METHODS[self.method]
        if self.method == "slerp":
            return f"slerp t={self.t:.4g}"
        parts = [self.method, f"w={fmt(self.weights)}"]
        if spec.trim:
            parts.append(f"density={fmt(self.densities)}")
        if spec.needs_base:
            parts.append(f"lambda={self.lam:g}")
        if self.normalize != spec.defaults.get("normalize"):
            parts.append(f"normalize={str(self.normalize).lower()}")
        if spec.trim == "random" and not self.rescale:
            parts.append("rescale=false")
        return " ".join(parts)
