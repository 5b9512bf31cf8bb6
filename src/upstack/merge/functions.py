"""The merge methods as functions of in-memory tensors: the same block kernels as `upstack merge`, so
library users and tests get exactly what the command writes."""

from __future__ import annotations

from upstack.merge.kernels import run_in_memory
from upstack.merge.methods import METHODS
from upstack.merge.methods.dare import dare_seed
from upstack.merge.methods.slerp import SLERP_DOT_THRESHOLD, SLERP_EPS
from upstack.merge.recipe import TensorRecipe


def _weights_for(n: int, weights) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} tensors")
    return weights


def _per_model(n: int, value, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    value = [float(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{len(value)} {name} values for {n} tensors")
    return value


def linear(tensors: list, weights: list[float] | None = None, normalize: bool = True):
    """sum_i w_i x_i / sum_i w_i in fp32 (a plain weighted sum with normalize=False); equal weights by default."""
    weights = _weights_for(len(tensors), weights)
    if normalize and sum(weights) == 0:
        raise ValueError("weights sum to zero")
    return run_in_memory(TensorRecipe("linear", weights=weights, normalize=normalize), list(tensors))


def slerp(a, b, t: float, eps: float = SLERP_EPS, dot_threshold: float = SLERP_DOT_THRESHOLD):
    """Spherical interpolation from a (t=0) to b (t=1) in fp32; lerp when they are nearly colinear."""
    return run_in_memory(TensorRecipe("slerp", t=t, eps=eps, dot_threshold=dot_threshold), [a, b])


def task_arithmetic(base, tensors: list, weights: list[float] | None = None, lam: float = 1.0,
                    normalize: bool = False):
    """base + lam * sum_i w_i (x_i - base) (divided by sum_i w_i when normalize), in fp32."""
    weights = _weights_for(len(tensors), weights)
    recipe = TensorRecipe("task_arithmetic", weights=weights, lam=lam, normalize=normalize)
    return run_in_memory(recipe, [base, *tensors])


def ties(base, tensors: list, weights: list[float] | None = None, density: float | list[float] = 1.0,
         lam: float = 1.0, normalize: bool = True):
    """TIES: keep each task vector's top int(density * numel) entries by magnitude, elect each entry's
    sign by the summed weighted deltas, and combine the agreeing ones (averaged by their weights when
    normalize); base + lam * that, in fp32."""
    n = len(tensors)
    recipe = TensorRecipe("ties", weights=_weights_for(n, weights), densities=_per_model(n, density, "density"),
                          lam=lam, normalize=normalize)
    return run_in_memory(recipe, [base, *tensors])


def dare(base, tensors: list, weights: list[float] | None = None, density: float | list[float] = 1.0,
         lam: float = 1.0, *, seed: int = 0, name: str = "", ties: bool = False, normalize: bool | None = None,
         rescale: bool = True):
    """DARE: drop each task-vector entry with probability 1 - density (seeded by seed, the tensor name and
    the model's index, exactly as `upstack merge` draws it), rescale kept entries by 1/density, then
    combine linearly (dare_linear) or with TIES sign election (ties=True: dare_ties)."""
    method = "dare_ties" if ties else "dare_linear"
    n = len(tensors)
    if normalize is None:
        normalize = METHODS[method].defaults["normalize"]
    recipe = TensorRecipe(method, weights=_weights_for(n, weights), densities=_per_model(n, density, "density"),
                          lam=lam, normalize=normalize, rescale=rescale,
                          seeds=[dare_seed(seed, name, i) for i in range(n)])
    return run_in_memory(recipe, [base, *tensors])
