"""Resolving the method's parameters for each output tensor (recipes) and planning the output tensors."""

from __future__ import annotations

from upstack.errors import ConfigError
from upstack.merge.methods.dare import dare_seed
from upstack.merge.recipe import TensorRecipe
from upstack.merge.settings import check_range, resolve_setting
from upstack.merge.spec import MethodSpec


def recipe_for(method: str, spec: MethodSpec, name: str, depth: float, glob: dict, settings: list[dict],
                seed: int) -> TensorRecipe:
    def g(pname):
        return resolve_setting(pname, [glob], name, depth, spec.defaults[pname])

    def m(pname, i):
        return resolve_setting(pname, [settings[i], glob], name, depth, spec.defaults[pname])

    if method == "slerp":
        t = g("t")
        check_range("t", t, f"tensor {name!r}")
        return TensorRecipe("slerp", t=float(t))
    n = len(settings)
    weights = [float(m("weight", i)) for i in range(n)]
    normalize = bool(g("normalize"))
    recipe = TensorRecipe(method, weights=weights, normalize=normalize)
    if normalize and not spec.consensus and sum(weights) == 0:
        raise ConfigError(f"weights sum to zero for tensor {name!r} ({weights}): a weighted average "
                          "divides by their sum (use normalize: false for a plain sum)")
    if spec.needs_base:
        recipe.lam = float(g("lambda"))
    if spec.trim:
        recipe.densities = [float(m("density", i)) for i in range(n)]
        for d in recipe.densities:
            check_range("density", d, f"tensor {name!r}")
    if spec.trim == "random":
        recipe.rescale = bool(g("rescale"))
        recipe.seeds = [dare_seed(seed, name, i) for i in range(n)]
    return recipe


def recipe_params(recipe: TensorRecipe, spec: MethodSpec) -> dict:
    if recipe.method == "slerp":
        return {"t": recipe.t}
    params: dict = {"weight": recipe.weights}
    if spec.trim:
        params["density"] = recipe.densities
    if spec.needs_base:
        params["lambda"] = recipe.lam
    params["normalize"] = recipe.normalize
    return params
