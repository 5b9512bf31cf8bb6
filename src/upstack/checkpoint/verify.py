"""Inspect and verify checkpoint folders."""

from __future__ import annotations

import json
from pathlib import Path

from upstack.arch import ARCHS, GENERIC, is_head, split_layer_name
from upstack.checkpoint.dtypes import DTYPE_SIZES, TORCH_DTYPE_NAMES
from upstack.checkpoint.finite import FLOAT_DTYPES, all_finite, count_nonfinite
from upstack.checkpoint.reader import (
    Checkpoint,
    open_checkpoint,
    read_index,
    read_tensor_bytes,
)
from upstack.errors import CheckpointError

SCAN_CHUNK_BYTES = 64 << 20  # bytes of one tensor read at a time by the NaN/inf scan


def inspect_checkpoint(folder: str | Path, *, allow_pickle: bool = False) -> dict:
    """Facts about a checkpoint folder: architecture, sizes, dtypes, tied embeddings, per-layer fields."""
    folder = Path(folder)
    ckpt = open_checkpoint(folder, allow_pickle=allow_pickle, weights_required=False)
    cfg = ckpt.config
    arch = ARCHS.get(cfg.get("model_type"), GENERIC)
    per_layer = {f.name: cfg[f.name] for f in arch.layer_fields if f.name in cfg}
    disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    provenance = None
    if (folder / "upstack.json").is_file():
        try:
            provenance = json.loads((folder / "upstack.json").read_text())
        except (OSError, json.JSONDecodeError):
            provenance = None
    return {
        "folder": str(folder),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "supported": cfg.get("model_type") in ARCHS,
        "num_hidden_layers": cfg.get(arch.layer_count_key),
        "hidden_size": cfg.get("hidden_size"),
        "intermediate_size": cfg.get("intermediate_size"),
        "num_attention_heads": cfg.get("num_attention_heads"),
        "num_key_value_heads": cfg.get("num_key_value_heads"),
        "vocab_size": cfg.get("vocab_size"),
        "num_parameters": ckpt.num_parameters,
        "dtypes": ckpt.dtypes,
        "config_dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "tensor_bytes": ckpt.total_bytes,
        "bytes_on_disk": disk,
        "num_tensors": len(ckpt.tensors),
        "weight_files": [p.name for p in ckpt.weight_files],
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "has_lm_head": any(is_head(n, arch) for n in ckpt.tensors),
        "per_layer_fields": per_layer,
        "upstack": provenance,
    }


def meta_model(config: dict):
    """The transformers causal LM of a config.json, built on the meta device (shapes only, no memory).

    Raises KeyError without model_type, and whatever transformers raises for a config it cannot build.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = {k: v for k, v in config.items() if k != "architectures"}
    model_type = cfg_dict.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **cfg_dict)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes transformers expects for this config (meta device, no memory)."""
    if not config.get("model_type"):
        return None
    try:
        model = meta_model(config)
    except Exception:  # unknown or remote-code architectures: shape check not possible
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def verify_checkpoint(folder: str | Path, *, load: bool = False, allow_pickle: bool = False) -> dict:
    """Check a checkpoint folder is complete and consistent; optionally load it and run a forward pass.

    Returns {"ok", "problems", "warnings", "checks"}. Structural problems that make the folder
    unreadable (bad header, missing shard, unsafe index path) are reported as problems too.
    """
    folder = Path(folder)
    problems: list[str] = []
    warnings: list[str] = []
    checks: list[str] = []
    try:
        ckpt = open_checkpoint(folder, allow_pickle=allow_pickle)
    except CheckpointError as e:
        if not folder.is_dir():
            raise
        return {"ok": False, "problems": [str(e)], "warnings": [], "checks": []}
    checks.append(f"{len(ckpt.weight_files)} weight file(s), headers strict and complete, index consistent")
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        total = read_index(index_path).get("metadata", {}).get("total_size")
        if total is None:
            warnings.append("index has no metadata.total_size")
        elif total != ckpt.total_bytes:
            problems.append(f"index metadata.total_size={total} but tensors hold {ckpt.total_bytes} bytes")
        else:
            checks.append(f"index total_size {total} matches")
    cfg = ckpt.config
    arch = ARCHS.get(cfg.get("model_type"))
    if arch is None:
        warnings.append(f"model_type {cfg.get('model_type')!r} is not in upstack's architecture table")
        arch = GENERIC
    n = cfg.get(arch.layer_count_key)
    seen_layers = {s[0] for s in (split_layer_name(k, arch) for k in ckpt.tensors) if s}
    if type(n) is int:
        if seen_layers != set(range(n)):
            missing = sorted(set(range(n)) - seen_layers)
            extra = sorted(seen_layers - set(range(n)))
            problems.append(f"config says {n} layers; layers missing: {missing[:10]}, unexpected: {extra[:10]}")
        else:
            checks.append(f"{n} layers present")
        for f in arch.layer_fields:
            if f.kind == "list" and isinstance(cfg.get(f.name), list) and len(cfg[f.name]) != n:
                problems.append(f"config {f.name} has {len(cfg[f.name])} entries for {n} layers")
    expected = _expected_shapes(cfg)
    if expected is None:
        warnings.append("transformers cannot build this config; tensor shapes not checked against it")
    else:
        tied = bool(cfg.get("tie_word_embeddings", False))
        for name, shape in expected.items():
            ref = ckpt.tensors.get(name)
            if ref is None:
                if not (tied and is_head(name, arch)):
                    problems.append(f"tensor {name} {list(shape)} expected by config is missing")
            elif tuple(ref.shape) != shape:
                problems.append(f"tensor {name} has shape {list(ref.shape)}, config implies {list(shape)}")
        unexpected = sorted(set(ckpt.tensors) - set(expected))
        if unexpected:
            warnings.append(f"{len(unexpected)} tensor(s) the model does not use, e.g. {unexpected[0]}")
        if not problems:
            checks.append(f"all {len(expected)} tensor shapes match config.json")
    floats = sum(1 for r in ckpt.tensors.values() if r.dtype in FLOAT_DTYPES)
    bad = scan_nonfinite(ckpt)
    if bad:
        names = ", ".join(f"{k} ({v})" for k, v in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        problems.append(f"{len(bad)} tensor(s) hold non-finite values (NaN or inf; count in brackets): {names}{more}")
    else:
        checks.append(f"all {floats} floating tensors finite (no NaN or inf)")
    if load and not problems:
        problems += _load_and_forward(folder, checks)
    return {"ok": not problems, "problems": problems, "warnings": warnings, "checks": checks}


def scan_nonfinite(ckpt: Checkpoint) -> dict[str, int]:
    """tensor name -> number of NaN/inf elements, for every floating tensor that has any. Reads each tensor
    in pieces of SCAN_CHUNK_BYTES, so memory stays bounded whatever the tensor's size."""
    import torch

    bad: dict[str, int] = {}
    for ref in ckpt.tensors.values():
        dt = getattr(torch, TORCH_DTYPE_NAMES.get(ref.dtype, ""), None)
        if ref.dtype not in FLOAT_DTYPES or dt is None or not ref.nbytes:
            continue
        size = DTYPE_SIZES[ref.dtype]
        step = max(size, SCAN_CHUNK_BYTES // size * size)
        n = 0
        for start in range(0, ref.nbytes, step):
            x = torch.frombuffer(read_tensor_bytes(ref, start, min(ref.nbytes, start + step)), dtype=dt)
            if not all_finite(x):
                n += count_nonfinite(x)
        if n:
            bad[ref.name] = n
    return bad


def _load_and_forward(folder: Path, checks: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as e:  # report any loader failure as a verify problem
        return [f"transformers could not load the folder: {type(e).__name__}: {e}"]
    vocab = model.config.vocab_size
    ids = torch.arange(min(8, vocab)).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        return ["forward pass gave non-finite logits"]
    checks.append(f"loaded with AutoModelForCausalLM; forward pass logits {list(logits.shape)} finite")
    return []
