"""Depth up-scaling: layer plans (dus, stack, interleave, explicit ranges) -> tensor plans -> checkpoint.

SOLAR's DUS (arXiv 2312.15166): from an n-layer base keep layers [0, n-m) of one copy and [m, n) of
another, s = 2(n-m) layers: output layer i is source layer i for i < n-m, else i-(n-2m).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from pathlib import Path

from upstack import __version__
from upstack.arch import (
    ArchSpec,
    format_layer_ranges,
    get_arch,
    layer_name,
    layer_runs,
    num_layers,
    parse_layer_ranges,
    remap_config,
    split_layer_name,
)
from upstack.checkpoint import (
    DTYPE_SIZES,
    Checkpoint,
    TensorPlan,
    TensorRef,
    assign_shards,
    check_surgery_output,
    meta_model,
    model_card_front_matter,
    normalize_dtype,
    open_checkpoint,
    resolve_model_dir,
    set_config_dtype,
    source_plan,
    write_surgery_output,
)
from upstack.config import parse_bytes
from upstack.errors import ConfigError, UpstackError
from upstack.seam import SeamOptions, analyse_seams, check_seam_options, seam_layer_map, seam_record

METHODS = ("dus", "stack", "interleave")


@dataclasses.dataclass
class UpscaleConfig:
    """Options of `upstack upscale` (CLI flags and recipe keys are the same names)."""

    source: str
    out: str
    method: str = "dus"
    m: int | None = None            # dus: layers dropped at the seam (default n // 4, SOLAR's 8 of 32)
    layers: str | None = None       # explicit "0-23,8-31" (end-inclusive ranges), overrides method
    every: int | None = None        # interleave: a zero-initialised copy after every K blocks
    dtype: str | None = None        # cast floating tensors (default: keep the source dtype and bytes)
    shard_size: str = "5GB"
    overwrite: bool = False
    dry_run: bool = False
    allow_unknown_arch: bool = False
    allow_pickle: bool = False
    quiet: bool = False
    # Where the duplicated block goes (dus): "solar" (layers [0, n-m) + [m, n)) or "auto" (the placement
    # of the same depth with the lowest seam score, upstack.seam; needs `calibration`).
    seam: str = "solar"
    seam_score: str = "angle"       # angle | perplexity (needs `perplexity`)
    calibration: str | None = None  # text data spec the seam's hidden states are measured on
    perplexity: str | None = None   # held-out text data spec: step-0 perplexity of every placement
    seam_batch_size: int = 4
    seam_max_length: int = 256
    seam_batches: int = 8
    seam_device: str | None = None
    seam_dtype: str = "auto"


SEAMS = ("solar", "auto")


def seam_options(cfg: UpscaleConfig) -> SeamOptions:
    return SeamOptions(calibration=cfg.calibration or "", perplexity=cfg.perplexity, score=cfg.seam_score,
                       batch_size=cfg.seam_batch_size, max_length=cfg.seam_max_length, batches=cfg.seam_batches,
                       device=cfg.seam_device, dtype=cfg.seam_dtype, allow_pickle=cfg.allow_pickle, quiet=cfg.quiet)


def _check_seam(cfg: UpscaleConfig) -> None:
    if cfg.seam not in SEAMS:
        raise ConfigError(f"--seam {cfg.seam!r}: choose from {', '.join(SEAMS)}")
    if cfg.seam == "solar":
        given = [f for f, v in (("--calibration", cfg.calibration), ("--perplexity", cfg.perplexity)) if v]
        if given:
            raise ConfigError(f"{' and '.join(given)} without --seam auto would be ignored (SOLAR's cut reads no text)")
        return
    if cfg.layers or cfg.method != "dus":
        what = "--layers" if cfg.layers else f"--method {cfg.method}"
        raise ConfigError(f"--seam auto places the duplicated block of --method dus; {what} gives the layer order "
                          "itself")
    if not cfg.calibration:
        raise ConfigError("--seam auto needs --calibration TEXT (the text the seam's hidden states are measured on)")
    check_seam_options(seam_options(cfg), "--seam-")


def check_upscale_config(cfg: UpscaleConfig) -> None:
    """Values only (the source's layer count is checked when the stage runs): the pipeline runs this
    before any stage."""
    parse_bytes(cfg.shard_size, "--shard-size")
    if cfg.dtype:
        normalize_dtype(cfg.dtype)
    if cfg.layers:
        given = [flag for flag, value in (("--m", cfg.m), ("--every", cfg.every)) if value is not None]
        if given:
            raise ConfigError(f"{' and '.join(given)} with --layers: --layers gives the whole layer order, so "
                              f"{' and '.join(given)} would be ignored; give one or the other")
        parse_layer_ranges(cfg.layers)
    elif cfg.method not in METHODS:
        raise ConfigError(f"unknown method {cfg.method!r} (choose from {', '.join(METHODS)})")
    if cfg.m is not None and cfg.m < 0:
        raise ConfigError(f"--m {cfg.m} is out of range (need m >= 0)")
    if cfg.method == "interleave" and not cfg.layers and (cfg.every is None or cfg.every < 1):
        raise ConfigError(f"--method interleave needs --every K with K >= 1, got {cfg.every}")
    _check_seam(cfg)


@dataclasses.dataclass
class LayerPlan:
    layer_map: list[int]            # source layer index per output layer
    new_layers: list[int]           # output layers whose residual outputs are zeroed (interleave)
    description: str


def make_layer_plan(n: int, method: str = "dus", m: int | None = None, layers: str | None = None,
                    every: int | None = None) -> LayerPlan:
    """The output layer order for an n-layer source."""
    if layers:
        lm = parse_layer_ranges(layers, n)
        return LayerPlan(lm, [], f"layers {layers}")
    if method == "dus":
        m = n // 4 if m is None else m
        if m < 0 or 2 * (n - m) <= 0:
            raise ConfigError(f"--m {m} is out of range for a {n}-layer model (need 0 <= m < {n})")
        lm = list(range(n - m)) + list(range(m, n))
        return LayerPlan(lm, [], f"dus m={m}: [0..{n - m - 1}] + [{m}..{n - 1}]")
    if method == "stack":
        return LayerPlan(list(range(n)) * 2, [], f"stack: [0..{n - 1}] twice")
    if method == "interleave":
        if every is None or every < 1 or every > n:
            raise ConfigError(f"--method interleave needs --every K with 1 <= K <= {n}, got {every}")
        lm, new = [], []
        for i in range(n):
            lm.append(i)
            if (i + 1) % every == 0:
                new.append(len(lm))
                lm.append(i)
        return LayerPlan(lm, new, f"interleave: a zeroed copy after every {every} blocks")
    raise ConfigError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")


def _group_layers(ckpt: Checkpoint, arch: ArchSpec, n: int):
    """Split tensors into per-layer dicts (rest name -> ref) and non-layer refs; check consistency."""
    per_layer: list[dict[str, TensorRef]] = [{} for _ in range(n)]
    others: list[TensorRef] = []
    for name, ref in ckpt.tensors.items():
        split = split_layer_name(name, arch)
        if split is None:
            others.append(ref)
            continue
        i, rest = split
        if i >= n:
            raise UpstackError(f"{ckpt.folder}: tensor {name!r} is for layer {i} but config.json says "
                               f"{arch.layer_count_key}={n}")
        per_layer[i][rest] = ref
    names0 = set(per_layer[0])
    for i, layer in enumerate(per_layer):
        if not layer:
            raise UpstackError(f"{ckpt.folder}: no tensors for layer {i} (config.json says {n} layers; "
                               "missing from the index?)")
        if set(layer) != names0:
            diff = sorted(set(layer) ^ names0)
            raise UpstackError(f"{ckpt.folder}: layer {i} has different tensors from layer 0: {', '.join(diff[:4])}")
    return per_layer, others


def _zeros_plan(name: str, ref: TensorRef, dtype: str) -> TensorPlan:
    nbytes = math.prod(ref.shape) * DTYPE_SIZES[dtype]

    def compute():
        chunk = 64 << 20
        for a in range(0, nbytes, chunk):
            yield bytes(min(chunk, nbytes - a))

    return TensorPlan(name, dtype, ref.shape, compute=compute, description=f"zeros (shape of {ref.name})")


def plan_tensors(ckpt: Checkpoint, arch: ArchSpec, layer_plan: LayerPlan, dtype: str | None = None) -> list[TensorPlan]:
    """Tensor plans: non-layer tensors as in the source, then output layers in order."""
    n = num_layers(ckpt.config, arch)
    per_layer, others = _group_layers(ckpt, arch, n)
    new = set(layer_plan.new_layers)
    order = sorted(ckpt.tensors.values(), key=lambda r: (str(r.path), r.offset))
    first_layer_pos = next((k for k, r in enumerate(order) if split_layer_name(r.name, arch)), len(order))
    before = {r.name for r in order[:first_layer_pos]}
    plans = [source_plan(r.name, r, dtype) for r in others if r.name in before]
    for j, i in enumerate(layer_plan.layer_map):
        zeroed = 0
        for rest, ref in per_layer[i].items():
            out_name = layer_name(j, rest, arch)
            if j in new and any(fnmatch.fnmatchcase(rest, pat) for pat in arch.residual_out):
                plans.append(_zeros_plan(out_name, ref, dtype or ref.dtype))
                zeroed += 1
            else:
                plans.append(source_plan(out_name, ref, dtype))
        if j in new and zeroed == 0:
            raise UpstackError(f"interleave: found no residual output projections to zero in layer {i} "
                               f"(looked for {', '.join(arch.residual_out)})")
    plans += [source_plan(r.name, r, dtype) for r in others if r.name not in before]
    return plans


def count_parameters_from_config(config: dict) -> int:
    """Exact parameter count of a config, by building the model on the meta device (no memory)."""
    model_type = config.get("model_type")  # none: meta_model's KeyError, reported below
    try:
        model = meta_model(config)
    except Exception as e:  # transformers raises several types for configs it cannot build
        raise UpstackError(f"cannot count parameters for model_type={model_type!r} from config.json "
                           f"({type(e).__name__}: {e})") from None
    return sum(p.numel() for p in model.parameters())


def _config_dtype(config: dict) -> str | None:
    value = config.get("dtype") or config.get("torch_dtype")
    try:
        return normalize_dtype(value) if isinstance(value, str) else None
    except UpstackError:
        return None


def upscale_model_card(cfg: UpscaleConfig, src_config: dict, new_config: dict, layer_plan: LayerPlan,
                       num_params: int, seam: dict | None = None) -> str:
    """README.md of an up-scaled checkpoint: the source, the layer plan and its layer table."""
    arch = src_config.get("model_type", "?")
    lines = [
        *model_card_front_matter(Path(cfg.source).name, ["upstack", "depth-up-scaling"], Path(cfg.out).name),
        f"Made by upstack {__version__} from `{cfg.source}` ({arch}, {src_config.get('num_hidden_layers')} layers) "
        f"by **{layer_plan.description}**, giving {new_config.get('num_hidden_layers')} layers and "
        f"{num_params:,} parameters.", "",
        "Depth up-scaling as in SOLAR 10.7B (arXiv 2312.15166). The model needs continued pretraining to "
        "recover from the seam before it is useful.", "",
        "| output layers | source layers |", "|---|---|",
    ]
    lines += [f"| {a}-{b} | {sa}-{sb} |" for a, b, sa, sb in layer_runs(layer_plan.layer_map)]
    if seam is not None:
        c, solar = seam["chosen"], seam["solar"]
        lines += ["", f"The duplicated block (layers {c['block'][0]}-{c['block'][1]}) was chosen by `upstack upscale "
                      f"--seam auto`: the lowest {'angular distance at the seam' if seam['score'] == 'angle' else 'step-0 held-out perplexity'} "
                      f"of the {len(seam['candidates'])} placements ({_seam_numbers(c)}"
                      + (f"; SOLAR's cut: {_seam_numbers(solar)}" if solar else "") + "). The table is in upstack.json."]
    if layer_plan.new_layers:
        lines += ["", f"Zero-initialised residual outputs (identity blocks) in output layers "
                      f"{format_layer_ranges(layer_plan.new_layers)}."]
    return "\n".join(lines) + "\n"


def _seam_numbers(c: dict) -> str:
    text = f"angular distance {c['angular_distance']:.4f}"
    return text + (f", perplexity {c['perplexity']:.4g}" if c.get("perplexity") is not None else "")


def upscale(cfg: UpscaleConfig) -> dict:
    """Run `upstack upscale`: plan, validate, then (unless dry_run) stream the new checkpoint."""
    check_upscale_config(cfg)
    out = Path(cfg.out)
    check_surgery_output(out, cfg.overwrite, cfg.dry_run)
    shard_size = parse_bytes(cfg.shard_size, "--shard-size")
    dtype = normalize_dtype(cfg.dtype) if cfg.dtype else None
    ckpt = open_checkpoint(resolve_model_dir(cfg.source), allow_pickle=cfg.allow_pickle, weights_required=not cfg.dry_run)
    arch = get_arch(ckpt.config, cfg.allow_unknown_arch)
    n = num_layers(ckpt.config, arch)
    if cfg.method not in METHODS and not cfg.layers:
        raise ConfigError(f"unknown method {cfg.method!r} (choose from {', '.join(METHODS)})")
    seam = None
    if cfg.seam == "auto":
        if not ckpt.tensors:
            raise ConfigError(f"--seam auto: {cfg.source} holds no weights (the seam is measured by running the model)")
        m = n // 4 if cfg.m is None else cfg.m
        seam = analyse_seams(str(ckpt.folder), m=m, opts=seam_options(cfg))
        j, k = seam["chosen"]["start"], seam["block_length"]
        layer_plan = LayerPlan(seam_layer_map(n, k, j), [], f"dus seam auto ({cfg.seam_score}), depth of m={m}: "
                                                         f"[0..{j + k - 1}] + [{j}..{n - 1}]")
    else:
        layer_plan = make_layer_plan(n, cfg.method, cfg.m, cfg.layers, cfg.every)
    new_config, notes = remap_config(ckpt.config, arch, layer_plan.layer_map)
    set_config_dtype(new_config, dtype)
    changes = {k: {"from": ckpt.config.get(k), "to": v} for k, v in new_config.items() if ckpt.config.get(k) != v}

    plans_by_shape: list[TensorPlan] = []
    if ckpt.tensors:
        plans = plan_tensors(ckpt, arch, layer_plan, dtype)
        num_params = sum(p.numel for p in plans)
        output_bytes = sum(p.nbytes for p in plans)
        source_params = ckpt.num_parameters
    else:  # a folder with only config.json: count from the config itself
        plans = []
        num_params = count_parameters_from_config(new_config)
        source_params = count_parameters_from_config(ckpt.config)
        out_dtype = dtype or _config_dtype(ckpt.config) or "F32"
        output_bytes = num_params * DTYPE_SIZES[out_dtype]
        shapes = {k: tuple(v.shape) for k, v in meta_model(new_config).state_dict().items()}
        plans_by_shape = [TensorPlan(k, out_dtype, shape, compute=iter) for k, shape in shapes.items()]
    if len(layer_plan.layer_map) <= n:
        note = (f"the output has {len(layer_plan.layer_map)} layers, not more than the source's {n}: "
                f"{layer_plan.description} does not up-scale")
        notes.append(note)
    report = {
        "source": str(cfg.source), "out": str(out), "method": "layers" if cfg.layers else cfg.method,
        "description": layer_plan.description, "model_type": ckpt.config.get("model_type"),
        "source_num_hidden_layers": n, "num_hidden_layers": len(layer_plan.layer_map),
        "layer_map": layer_plan.layer_map, "new_layers": layer_plan.new_layers,
        "source_parameters": source_params, "num_parameters": num_params, "output_bytes": output_bytes,
        "num_tensors": len(plans), "num_shards": _count_shards(plans or plans_by_shape, shard_size),
        "config_changes": changes, "notes": notes, "dry_run": cfg.dry_run,
    }
    if seam is not None:
        report["seam"] = seam
    if cfg.dry_run:
        return report
    provenance = {"upscale": {
        "source": str(cfg.source), "method": report["method"], "m": cfg.m if cfg.method == "dus" else None,
        "layers": cfg.layers, "every": cfg.every, "layer_map": layer_plan.layer_map,
        "new_layers": layer_plan.new_layers, "source_num_hidden_layers": n, "upstack_version": __version__,
    }}
    if seam is not None:  # only then: a SOLAR cut writes the same upstack.json as before the option existed
        provenance["upscale"]["seam"] = seam_record(seam)
    write_surgery_output(
        plans, out, config=new_config, provenance=provenance,
        model_card=upscale_model_card(cfg, ckpt.config, new_config, layer_plan, num_params, seam),
        aux_from=ckpt.folder, shard_size=shard_size, overwrite=cfg.overwrite, progress=not cfg.quiet,
    )
    return report


def _count_shards(plans: list[TensorPlan], shard_size: int) -> int:
    return len(assign_shards(plans, shard_size)) if plans else 0
