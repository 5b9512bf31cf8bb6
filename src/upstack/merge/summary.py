"""What a merge reports: tensors grouped by name pattern, parameters formatted, the resolved config
(recorded in upstack.json) and the model card."""

from __future__ import annotations

import re
from pathlib import Path

from upstack import __version__
from upstack.checkpoint import model_card_front_matter
from upstack.merge.methods import METHODS
from upstack.merge.settings import MergeConfig


def tensor_group(name: str) -> str:
    """'model.layers.7.mlp.up_proj.weight' -> 'model.layers.*.mlp.up_proj.weight'."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def summarize_groups(rows: list[dict]) -> list[dict]:
    """Tensors grouped by name pattern; a parameter that varies within a group is shown as its
    {"min", "max"} (element-wise for per-model lists)."""
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(tensor_group(r["name"]), {"group": tensor_group(r["name"]), "tensors": 0,
                                                         "method": r["method"], "params": {}})
        g["tensors"] += 1
        for k, v in r["params"].items():
            if k not in g["params"]:
                g["params"][k] = {"min": v, "max": v}
                continue
            cur = g["params"][k]
            if isinstance(v, list):
                cur["min"] = [min(a, b) for a, b in zip(cur["min"], v)]
                cur["max"] = [max(a, b) for a, b in zip(cur["max"], v)]
            else:
                cur["min"], cur["max"] = min(cur["min"], v), max(cur["max"], v)
    for g in groups.values():
        g["params"] = {k: (v["min"] if v["min"] == v["max"] else v) for k, v in g["params"].items()}
    return list(groups.values())


def format_param(value) -> str:
    """0.5 -> '0.5'; [0.4, 0.6] -> '[0.4, 0.6]'; {"min": 0, "max": 1} -> '0..1'."""
    if isinstance(value, dict):
        return f"{format_param(value['min'])}..{format_param(value['max'])}"
    if isinstance(value, list):
        return "[" + ", ".join(format_param(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def resolved_config(cfg: MergeConfig, method: str) -> dict:
    """The merge as a config mapping (what the model card and upstack.json record; re-runnable)."""
    models = []
    for e in cfg.models:
        entry: dict = {"model": str(e.model)}
        params = dict(e.parameters or {})
        if e.weight is not None:
            params["weight"] = e.weight
        if params:
            entry["parameters"] = params
        models.append(entry)
    out = {"models": models, "method": method}
    if cfg.base:
        out["base"] = str(cfg.base)
    out["parameters"] = dict(cfg.parameters or {})
    if cfg.dtype:
        out["dtype"] = cfg.dtype
    if METHODS[method].trim == "random":
        out["seed"] = cfg.seed
    return out


def merge_model_card(cfg: MergeConfig, method: str, resolved: dict, report: dict) -> str:
    """README.md of a merged checkpoint: the models, the method, parameters per tensor group, the config."""
    import yaml

    names = [Path(e.model).name for e in cfg.models]
    lines = [
        *model_card_front_matter(names, ["upstack", "merge"], Path(cfg.out).name),
        f"Made by upstack {__version__} by merging {len(cfg.models)} models with **{method}** "
        f"({METHODS[method].doc}).", "",
        "## Models", "",
        *[f"- `{e.model}`" for e in cfg.models],
    ]
    if cfg.base:
        lines += ["", f"Base model: `{cfg.base}`."]
    lines += ["", "## Parameters", "", "| tensors | count | parameters |", "|---|---|---|"]
    for g in report["groups"]:
        params = ", ".join(f"{k}={format_param(v)}" for k, v in g["params"].items())
        lines.append(f"| `{g['group']}` | {g['tensors']} | {params} |")
    lines += ["", f"Tied embeddings: {str(report['tie_word_embeddings']).lower()}. "
                  "Tokenizer, chat template and generation config come from "
                  f"`{report['reference']}`.", "",
              "## Configuration", "", "```yaml", yaml.safe_dump(resolved, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
