"""The merge stage: `merge(cfg)` checks the models against each other, resolves every parameter for
every tensor, builds one `TensorPlan` per output tensor, and (unless a dry run) streams them through
checkpoint's writer (the same writer and stage ending as `upstack upscale`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from upstack import __version__
from upstack.arch import ArchSpec, embed_name, get_arch, tied
from upstack.checkpoint import (
    Checkpoint,
    TensorPlan,
    TensorRef,
    assign_shards,
    check_surgery_output,
    normalize_dtype,
    open_checkpoint,
    set_config_dtype,
    write_surgery_output,
)
from upstack.config import parse_bytes
from upstack.errors import ConfigError
from upstack.merge.compat import check_compatible
from upstack.merge.methods import METHODS
from upstack.merge.plan import recipe_for, recipe_params
from upstack.merge.settings import MergeConfig, tensor_depth, validate_config
from upstack.merge.spec import MethodSpec
from upstack.merge.streaming import Pipeline, Workspace, default_workers, tensor_plan
from upstack.merge.summary import merge_model_card, resolved_config, summarize_groups

FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")


def _same_path(p) -> str:
    return os.path.realpath(p)


@dataclasses.dataclass
class _Roles:
    """Which checkpoints are merged, in what order, with which per-model settings; `ref` is the
    checkpoint whose config, tokenizer and tensor order the output takes (the base, or the first)."""

    inputs: list
    settings: list[dict]
    base: str | None
    ref: str


@dataclasses.dataclass
class _Models:
    """The opened checkpoints of one merge, and how the output ties its head."""

    ref: Checkpoint
    ref_label: str
    inputs: list[Checkpoint]
    base: Checkpoint | None
    arch: ArchSpec
    num_layers: int | None

    @property
    def merged(self) -> list[Checkpoint]:
        return [*self.inputs, *([self.base] if self.base is not None else [])]

    def tied(self, ck: Checkpoint) -> bool:
        return tied(ck.config, ck.tensors, self.arch)

    @property
    def tied_out(self) -> bool:
        """A model without its own head uses its embedding; the output ties only if all do."""
        return all(self.tied(c) for c in self.merged)

    def source(self, ck: Checkpoint, name: str) -> TensorRef:
        """Where `name` comes from in `ck`: a tied model's embedding stands in for its head."""
        if name == self.arch.head_name and self.tied(ck):
            return ck.tensors[embed_name(ck.tensors, self.arch)]
        return ck.tensors[name]


def merge(cfg: MergeConfig) -> dict:
    """Run `upstack merge`: check, plan every output tensor, then (unless dry_run) stream the checkpoint."""
    method, glob, per_model = validate_config(cfg)
    spec = METHODS[method]
    out = _output_folder(cfg)
    shard_size = parse_bytes(cfg.shard_size, "--shard-size")
    out_dtype = _output_dtype(cfg)
    if out is not None and any(_same_path(p) == _same_path(out) for p in [*(e.model for e in cfg.models),
                                                                           cfg.base or ""] if p):
        raise ConfigError(f"--out {out} is one of the input models; write the merge to a new folder")
    roles = _roles(cfg, method, spec, per_model)
    models = _open_models(roles, cfg.allow_pickle, spec.needs_base)

    ws = Workspace(default_workers() if cfg.workers is None else cfg.workers)
    pipe = Pipeline(ws)
    plans, rows, notes = _plan_tensors(pipe, models, method, spec, glob, roles.settings, cfg.seed, out_dtype,
                                       cfg.allow_nonfinite)
    new_config = _output_config(models, out_dtype, notes)
    resolved = resolved_config(cfg, method)
    report = {
        "method": method, "models": [str(p) for p in roles.inputs],
        "base": str(roles.base) if roles.base else None, "reference": str(roles.ref),
        "out": str(out) if out else None, "parameters": resolved["parameters"],
        "model_parameters": [s for s in roles.settings], "seed": cfg.seed,
        "output_dtype": ", ".join(sorted({p.dtype for p in plans})),
        "tie_word_embeddings": models.tied_out, "num_tensors": len(plans),
        "num_parameters": sum(p.numel for p in plans), "output_bytes": sum(p.nbytes for p in plans),
        "num_shards": len(assign_shards(plans, shard_size)), "groups": summarize_groups(rows),
        "tensors": [dict(r, description=p.description) for r, p in zip(rows, plans)],
        "notes": notes, "dry_run": cfg.dry_run,
    }
    if cfg.dry_run:
        ws.close()
        return report
    try:
        _write(plans, out, cfg, new_config, models.ref, shard_size, method,
               provenance={"merge": {**resolved, "upstack_version": __version__}},
               card=merge_model_card(cfg, method, resolved, report))
    finally:
        pipe.stop()
        ws.close()
    return report


def _output_folder(cfg: MergeConfig) -> Path | None:
    if not cfg.out and not cfg.dry_run:
        raise ConfigError("no output folder (--out DIR, or out: in the config)")
    out = Path(cfg.out) if cfg.out else None
    check_surgery_output(out, cfg.overwrite, cfg.dry_run)
    return out


def _output_dtype(cfg: MergeConfig) -> str | None:
    out_dtype = normalize_dtype(cfg.dtype) if cfg.dtype else None
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype}: merged tensors must be a float type (float32, bfloat16, float16)")
    return out_dtype


def _roles(cfg: MergeConfig, method: str, spec: MethodSpec, per_model: list[dict]) -> _Roles:
    """slerp: the base (if given) is the t=0 end; task-vector methods: the base is not merged as a
    model; linear: the models as given."""
    key = _same_path
    model_paths = [e.model for e in cfg.models]
    base_path = cfg.base
    if method == "slerp":
        order = list(range(len(model_paths)))
        if base_path is not None:
            hits = [i for i, p in enumerate(model_paths) if key(p) == key(base_path)]
            if hits:
                order = [hits[0]] + [i for i in order if i != hits[0]]
                inputs = [model_paths[i] for i in order]
                settings = [per_model[i] for i in order]
            else:
                inputs, settings = [base_path, *model_paths], [{}, *per_model]
        else:
            inputs, settings = model_paths, per_model
        if len(inputs) != 2:
            raise ConfigError(f"slerp interpolates exactly two models, got {len(inputs)} "
                              "(the base, if given, is the t=0 end)")
    elif spec.needs_base:
        keep = [i for i, p in enumerate(model_paths) if key(p) != key(base_path)]
        inputs = [model_paths[i] for i in keep]
        settings = [per_model[i] for i in keep]
        if not inputs:
            raise ConfigError(f"{method} needs at least one model besides the base")
    else:
        inputs, settings = model_paths, per_model
        if len(inputs) < 2:
            raise ConfigError(f"{method} needs at least two models, got {len(inputs)}")
    return _Roles(inputs, settings, base_path, base_path if base_path is not None else inputs[0])


def _open_models(roles: _Roles, allow_pickle: bool, base_merged: bool) -> _Models:
    """Open every checkpoint once, then check each against the reference. `base_merged`: the base's
    task vectors are differences from it (the task-vector methods)."""
    key = _same_path
    labels: dict[str, str] = {}
    ckpts: dict[str, Checkpoint] = {}
    for p in dict.fromkeys([roles.ref, *roles.inputs]):
        if key(p) not in ckpts:
            ckpts[key(p)] = open_checkpoint(p, allow_pickle=allow_pickle)
            labels[key(p)] = str(p)
    ref = ckpts[key(roles.ref)]
    arch = get_arch(ref.config, allow_unknown=True)
    for k, ck in ckpts.items():
        if k != key(roles.ref):
            check_compatible(ref, labels[key(roles.ref)], ck, labels[k], arch)
    n_layers = ref.config.get(arch.layer_count_key)
    return _Models(ref, labels[key(roles.ref)], [ckpts[key(p)] for p in roles.inputs],
                   ckpts[key(roles.base)] if base_merged else None,
                   arch, n_layers if type(n_layers) is int else None)


def _output_names(models: _Models) -> list[str]:
    """The reference's tensors in file order; the head where the reference stores it, or last."""
    ref, head = models.ref, models.arch.head_name
    in_order = [r.name for r in sorted(ref.tensors.values(), key=lambda r: (str(r.path), r.offset))]
    names = [n for n in in_order if n != head]
    if not models.tied_out:
        if head in ref.tensors and not models.tied(ref):
            names.insert(in_order.index(head), head)
        else:
            names.append(head)
    return names


def _plan_tensors(pipe: Pipeline, models: _Models, method: str, spec: MethodSpec, glob: dict,
                  settings: list[dict], seed: int, out_dtype: str | None, allow_nonfinite: bool = False):
    """One plan per output tensor (a copy for non-float tensors), with the rows and notes the report shows."""
    plans: list[TensorPlan] = []
    rows: list[dict] = []
    notes: list[str] = []
    dtype_mix = set()
    head = models.arch.head_name
    for name in _output_names(models):
        refs_in = [models.source(c, name) for c in models.inputs]
        base_ref = models.source(models.base, name) if models.base is not None else None
        ref_tensor = models.source(models.ref, name)
        shape = tuple(ref_tensor.shape)
        all_refs = ([base_ref] if base_ref is not None else []) + refs_in
        if any(r.dtype not in FLOAT_DTYPES for r in all_refs):
            plans.append(TensorPlan(name, ref_tensor.dtype, shape, copy=ref_tensor,
                                    description=f"copy from {models.ref_label} ({ref_tensor.dtype}: not merged)"))
            rows.append({"name": name, "shape": list(shape), "dtype": ref_tensor.dtype, "method": "copy", "params": {}})
            notes.append(f"{name}: {ref_tensor.dtype} tensor copied from {models.ref_label}, not merged")
            continue
        if len({r.dtype for r in all_refs}) > 1:
            dtype_mix.add(name)
        depth = tensor_depth(name, models.num_layers, models.arch)
        recipe = recipe_for(method, spec, name, depth, glob, settings, seed)
        t_dtype = out_dtype or ref_tensor.dtype
        desc = recipe.describe()
        if name == head and any(models.tied(c) for c in models.merged):
            desc += " (tied models contribute their embedding)"
        plans.append(tensor_plan(pipe, name, shape, t_dtype, recipe, all_refs, desc, allow_nonfinite))
        rows.append({"name": name, "shape": list(shape), "dtype": t_dtype, "method": method,
                     "params": recipe_params(recipe, spec)})
    if dtype_mix:
        notes.append(f"{len(dtype_mix)} tensor(s) have different dtypes across models; computed in fp32, "
                     f"written as {'--dtype ' + out_dtype if out_dtype else 'in the base/first model dtype'}")
    return plans, rows, notes


def _output_config(models: _Models, out_dtype: str | None, notes: list[str]) -> dict:
    """The reference's config.json with the output's tying and dtype (a note when tying changes)."""
    new_config = dict(models.ref.config)
    new_config["tie_word_embeddings"] = models.tied_out
    set_config_dtype(new_config, out_dtype)
    if not models.tied_out and any(models.tied(c) for c in models.merged):
        notes.append(f"some models tie lm_head to {embed_name(models.ref.tensors, models.arch)}: their embedding "
                     "stands in for lm_head, and the output stores its own lm_head (tie_word_embeddings: false)")
    return new_config


def _write(plans: list[TensorPlan], out: Path, cfg: MergeConfig, new_config: dict, ref: Checkpoint,
           shard_size: int, method: str, *, provenance: dict, card: str) -> None:
    import torch

    # Blocks run in our own worker threads, one torch thread each: torch's intra-op pool would put a
    # barrier after every small op, and on a busy machine each barrier waits for a descheduled thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_surgery_output(
            plans, out, config=new_config, provenance=provenance, model_card=card, aux_from=ref.folder,
            shard_size=shard_size, overwrite=cfg.overwrite, metadata={"upstack_merge": method},
            progress=not cfg.quiet,
        )
    finally:
        torch.set_num_threads(threads)
