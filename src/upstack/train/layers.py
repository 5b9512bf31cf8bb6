"""--train-layers: which decoder layers train, checked before loading and applied by freezing the rest."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Union

from upstack.arch import get_arch
from upstack.errors import ConfigError
from upstack.lm import read_upstack_json


def parse_train_layers(spec: Union[str, list[int]], n_layers: Optional[int]) -> Optional[list[int]] | str:
    """'all' -> None (everything trains); 'new' -> 'new'; '0-3,8' or [0, 1] -> sorted layer indices."""
    if isinstance(spec, list):
        layers = [int(x) for x in spec]
    else:
        text = spec.strip().lower()
        if text == "all":
            return None
        if text == "new":
            return "new"
        layers = []
        for part in text.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                raise ConfigError(f"train_layers: cannot read {part.strip()!r} in {spec!r} "
                                  "(use all, new, or indices and ranges like 0-3,8)")
            a, b = int(m.group(1)), int(m.group(2) or m.group(1))
            if b < a:
                raise ConfigError(f"train_layers: range {part.strip()!r} runs backwards")
            layers.extend(range(a, b + 1))
    if not layers:
        raise ConfigError("train_layers: the list is empty")
    if n_layers is not None:
        bad = [i for i in layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"train_layers: layer {bad[0]} is out of range; the model has {n_layers} layers "
                              f"(0-{n_layers - 1})")
    return sorted(set(layers))


def decoder_layers(model) -> tuple[str, int]:
    """(module path of the decoder-layer list, its length).

    The path is the architecture's layer prefix (arch.py, e.g. "model.layers"); for a model whose
    modules do not follow it, the first ModuleList as long as num_hidden_layers."""
    import torch.nn as nn

    arch = get_arch(model.config.to_dict(), allow_unknown=True)
    n = getattr(model.config, arch.layer_count_key, None)
    named = arch.layer_prefix.rstrip(".")
    try:
        mod = model.get_submodule(named)
    except AttributeError:
        mod = None
    if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
        return named, n
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return name, n
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__} (no ModuleList of "
                      f"num_hidden_layers={n} modules); use --train-layers all")


def check_train_layers(spec: Union[str, list[int]], model_dir: str) -> None:
    """--train-layers against the checkpoint's config.json and upstack.json, before anything is loaded."""
    layers = parse_train_layers(spec, None)
    folder = Path(model_dir)
    if layers is None or not (folder / "config.json").is_file():
        return
    conf = json.loads((folder / "config.json").read_text())
    n = conf.get("num_hidden_layers") or (conf.get("text_config") or {}).get("num_hidden_layers")
    if layers == "new":
        new_layers(model_dir, n)
    elif isinstance(n, int):
        parse_train_layers(layers, n)


def new_layers(model_dir: str, n_layers: Optional[int]) -> list[int]:
    """The layers `upstack upscale --method interleave` added, as recorded in the model's upstack.json."""
    meta = read_upstack_json(model_dir) or {}
    new = (meta.get("upscale") or {}).get("new_layers")
    if not new:
        raise ConfigError(
            f"--train-layers new: {Path(model_dir) / 'upstack.json'} records no new layers (it is written by "
            "`upstack upscale --method interleave`, which adds zero-initialised blocks); give layer indices instead")
    return parse_train_layers([int(i) for i in new], n_layers)


def freeze_for_training(model, spec: Union[str, list[int]], model_dir: str) -> dict:
    """Set requires_grad by --train-layers; return {"train_layers": [...] or "all", "trainable": n, "total": n}.

    For `new` and explicit lists only those decoder layers train; embeddings, final norm and lm_head are
    frozen. `new` reads the layer indices `upstack upscale --method interleave` recorded in upstack.json.
    """
    total = sum(p.numel() for p in model.parameters())
    layers = parse_train_layers(spec, None)
    if layers is None:
        for p in model.parameters():
            p.requires_grad_(True)
        return {"train_layers": "all", "trainable": total, "total": total}
    prefix, n_layers = decoder_layers(model)
    if layers == "new":
        layers = new_layers(model_dir, n_layers)
    else:
        layers = parse_train_layers(layers, n_layers)
    wanted = tuple(f"{prefix}.{i}." for i in layers)
    trainable = 0
    for name, p in model.named_parameters():
        on = name.startswith(wanted)
        p.requires_grad_(on)
        trainable += p.numel() if on else 0
    return {"train_layers": layers, "trainable": trainable, "total": total}
