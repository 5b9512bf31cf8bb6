"""The merge config (ours and mergekit's spellings) and parameter settings: scalars, gradients over
depth, per-tensor-group filters; validated before any file is opened."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, ClassVar

from upstack.arch import GENERIC, split_layer_name
from upstack.config import config_from_dict
from upstack.errors import ConfigError
from upstack.merge.methods import METHODS, canonical_method
from upstack.merge.spec import REQUIRED

BOOL_PARAMS = ("normalize", "rescale")


@dataclasses.dataclass
class ModelEntry:
    """One input model: a checkpoint folder, and its own parameters (mergekit: `parameters`). A bare string
    in a config or recipe (`models: [dpo, sft]`) is an entry with only `model`."""

    FROM_STRING: ClassVar[str] = "model"
    model: str
    weight: Any = None              # shortcut for parameters.weight
    parameters: dict | None = None


@dataclasses.dataclass
class MergeConfig:
    """Options of `upstack merge` (CLI flags and the YAML config fill the same fields)."""

    models: list[ModelEntry]
    method: str
    base: str | None = None
    # name -> setting: a number, a bool, a list of numbers (a gradient over layer depth), or a list of
    # {filter: substring, value: setting} tried in order (an entry without filter is the default).
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str | None = None        # output dtype; default: each tensor's dtype in the base/first model
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    shard_size: str = "5GB"
    allow_pickle: bool = False
    allow_nonfinite: bool = False   # write merged tensors holding NaN or inf (refused by default)
    quiet: bool = False
    workers: int | None = None      # compute threads (default: the CPUs this process may use, at most 8)


def normalize_config_dict(data: dict) -> dict:
    """Accept mergekit spellings: merge_method -> method, base_model -> base, `- path` model entries."""
    if not isinstance(data, dict):
        raise ConfigError(f"merge config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    for theirs, ours in (("merge_method", "method"), ("base_model", "base")):
        if theirs in data:
            if ours in data:
                raise ConfigError(f"merge config sets both {theirs!r} and {ours!r}; use one")
            data[ours] = data.pop(theirs)
    if isinstance(data.get("models"), list):
        data["models"] = [{"model": m} if isinstance(m, str) else m for m in data["models"]]
    if data.get("parameters") is None and "parameters" in data:
        data["parameters"] = {}
    return data


def config_from_yaml(path: str | Path, **overrides) -> MergeConfig:
    """Read a merge YAML file (our keys or mergekit's); `overrides` (not None) replace its values."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    data = normalize_config_dict(data if data is not None else {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(MergeConfig, data, str(path))


# Parameter settings: scalars, gradients over depth, per-tensor-group filters (mergekit's format)

def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_range(pname: str, v, where: str) -> None:
    if pname in BOOL_PARAMS:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: {pname} must be true or false, got {v!r}")
        return
    if not is_number(v) or not math.isfinite(v):
        raise ConfigError(f"{where}: {pname} must be a finite number, got {v!r}")
    if pname == "t" and not 0 <= v <= 1:
        raise ConfigError(f"{where}: t={v:g} is out of range (0 <= t <= 1; t=0 is the first model)")
    if pname == "density" and not 0 < v <= 1:
        raise ConfigError(f"{where}: density={v:g} is out of range (0 < density <= 1: the fraction of "
                          "each task vector kept)")


def check_setting(pname: str, setting, where: str):
    """Validate one parameter setting; return it in canonical form (a single condition becomes a list)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"{where}: {pname} is an empty list")
        if all(is_number(v) for v in setting):
            if pname in BOOL_PARAMS:
                raise ConfigError(f"{where}: {pname} must be true or false, not a list")
            for v in setting:
                check_range(pname, v, where)
            return [float(v) for v in setting]
        out = []
        for i, cond in enumerate(setting):
            w = f"{where}[{i}]"
            if not isinstance(cond, dict):
                raise ConfigError(f"{w}: expected a number, or {{filter: ..., value: ...}} entries; got {cond!r}")
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown:
                raise ConfigError(f"{w}: unknown key(s) {', '.join(unknown)} (a condition has filter and value)")
            if "value" not in cond:
                raise ConfigError(f"{w}: missing 'value'")
            flt = cond.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ConfigError(f"{w}: filter must be a string (a substring of tensor names), got {flt!r}")
            value = cond["value"]
            if isinstance(value, (list, dict)) and not (isinstance(value, list) and all(is_number(v) for v in value)):
                raise ConfigError(f"{w}: value must be a number or a list of numbers")
            out.append({"filter": flt, "value": check_setting(pname, value, f"{w}.value")})
        return out
    check_range(pname, setting, where)
    return float(setting) if is_number(setting) else setting


def evaluate_setting(setting, tensor_name: str, depth: float):
    """A setting's value for one tensor; depth in [0, 1] places the tensor in the layer stack.

    A list of numbers is a gradient: its entries are spread evenly from the first layer (depth 0) to
    the last (depth 1) and interpolated linearly in between. Conditions are tried in order; a filter
    matches when it is a substring of the tensor name; None when nothing matches.
    """
    if not isinstance(setting, list):
        return setting
    if setting and not isinstance(setting[0], dict):
        scaled = depth * (len(setting) - 1)
        i0 = min(int(scaled), len(setting) - 1)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond["filter"] in (None, "*") or cond["filter"] in tensor_name:
            return evaluate_setting(cond["value"], tensor_name, depth)
    return None


def tensor_depth(name: str, num_layers: int | None, arch=GENERIC) -> float:
    """Where a tensor sits for gradients: layer i of n at i/(n-1); embeddings at 0; norm and head at 1."""
    split = split_layer_name(name, arch)
    if split is None or not num_layers:
        return 0.0 if "embed" in name else 1.0
    return split[0] / (num_layers - 1) if num_layers > 1 else 1.0


def validate_config(cfg: MergeConfig) -> tuple[str, dict, list[dict]]:
    """Check method, models and parameters before any file is opened.

    Returns (method, global settings, per-model settings) in canonical form.
    """
    method = canonical_method(cfg.method)
    spec = METHODS[method]
    allowed = set(spec.defaults)
    if not cfg.models:
        raise ConfigError("no models to merge (give at least two checkpoint folders)")
    glob = {}
    for pname, setting in (cfg.parameters or {}).items():
        if pname not in allowed:
            raise ConfigError(f"parameter {pname!r} is not used by method {method} "
                              f"(it takes: {', '.join(sorted(allowed))})")
        glob[pname] = check_setting(pname, setting, f"parameters.{pname}")
    per_model = []
    for i, entry in enumerate(cfg.models):
        where = f"models[{i}] ({entry.model})"
        params = dict(entry.parameters or {})
        if entry.weight is not None:
            if "weight" in params:
                raise ConfigError(f"{where}: weight is given twice (weight and parameters.weight)")
            params["weight"] = entry.weight
        settings = {}
        for pname, setting in params.items():
            if pname not in spec.per_model:
                what = (f"it takes {', '.join(spec.per_model)} per model" if spec.per_model
                        else "it takes no per-model parameters")
                raise ConfigError(f"{where}: parameter {pname!r} is not a per-model parameter of {method} ({what})")
            settings[pname] = check_setting(pname, setting, f"{where}.parameters.{pname}")
        per_model.append(settings)
    for pname, default in spec.defaults.items():
        if default is REQUIRED and pname not in glob:
            raise ConfigError(f"method {method} needs parameter {pname} (e.g. --{pname} 0.5)")
    if spec.needs_base and not cfg.base:
        raise ConfigError(f"method {method} needs a base model (--base MODEL, or base: in the config): "
                          "task vectors are differences from it")
    if cfg.seed is None or type(cfg.seed) is not int:
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    if cfg.workers is not None and (type(cfg.workers) is not int or cfg.workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {cfg.workers!r}")
    return method, glob, per_model


def resolve_setting(pname: str, settings: list[dict], tensor: str, depth: float, default):
    for s in settings:
        if pname in s:
            v = evaluate_setting(s[pname], tensor, depth)
            if v is not None:
                return v
    if default is REQUIRED:
        raise ConfigError(f"parameter {pname} has no value for tensor {tensor!r} (no filter matches it and "
                          "there is no default entry without a filter)")
    return default
