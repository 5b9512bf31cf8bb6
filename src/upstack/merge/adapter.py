"""`upstack merge-adapter`: a PEFT LoRA adapter merged into its base checkpoint, streamed tensor by tensor.

The adapter may be ours (`upstack sft --lora` writes OUT/adapter/) or anyone's PEFT LoRA adapter (rsLoRA,
DoRA, rank/alpha patterns, modules_to_save). The plan is checkpoint's `plan_adapter_merge`; the output is
written by the same streaming writer and stage ending as `upscale` and `merge`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from upstack import __version__
from upstack.checkpoint import (
    adapter_summary,
    assign_shards,
    check_surgery_output,
    merge_threads,
    model_card_front_matter,
    normalize_dtype,
    open_adapter,
    open_checkpoint,
    plan_adapter_merge,
    resolve_model_dir,
    set_config_dtype,
    write_surgery_output,
)
from upstack.config import parse_bytes
from upstack.errors import ConfigError


@dataclasses.dataclass
class MergeAdapterConfig:
    base: str                          # the base checkpoint the adapter was trained on (unquantized)
    adapter: str                       # a PEFT adapter folder (adapter_config.json + adapter_model.safetensors)
    out: str
    dtype: str | None = None           # output dtype of the floating tensors; default: each base tensor's own
    shard_size: str = "5GB"
    overwrite: bool = False
    dry_run: bool = False
    allow_pickle: bool = False         # for a base stored as pickled .bin (the adapter must be safetensors)
    allow_nonfinite: bool = False      # write merged tensors holding NaN or inf (refused by default)
    quiet: bool = False


def check_config(cfg: MergeAdapterConfig) -> None:
    """Values only (no file is read): the pipeline calls this before any stage runs."""
    parse_bytes(cfg.shard_size, "--shard-size")
    if cfg.dtype:
        normalize_dtype(cfg.dtype)


def _model_card(cfg: MergeAdapterConfig, summary: dict, base_config: dict) -> str:
    kind = "DoRA" if summary["use_dora"] else ("rsLoRA" if summary["use_rslora"] else "LoRA")
    lines = [
        *model_card_front_matter(Path(cfg.base).name, ["upstack", "lora", "merged-adapter"], Path(cfg.out).name),
        f"Made by upstack {__version__}: the {kind} adapter `{cfg.adapter}` (r={summary['r']}, "
        f"alpha={summary['lora_alpha']}, {summary['modules']} modules) merged into `{cfg.base}` "
        f"({base_config.get('model_type', '?')}), W + scale * B @ A computed in fp32 per tensor.", "",
    ]
    if summary["replaced_tensors"]:
        lines += ["Tensors taken whole from the adapter: " + ", ".join(summary["replaced_tensors"]) + ".", ""]
    return "\n".join(lines)


def merge_adapter(cfg: MergeAdapterConfig) -> dict:
    """Check base and adapter against each other, plan every output tensor, then (unless a dry run) stream."""
    check_config(cfg)
    out = Path(cfg.out)
    check_surgery_output(out, cfg.overwrite, cfg.dry_run)
    dtype = normalize_dtype(cfg.dtype) if cfg.dtype else None
    base = open_checkpoint(resolve_model_dir(cfg.base), allow_pickle=cfg.allow_pickle)
    adapter = open_adapter(cfg.adapter)
    if Path(cfg.adapter).resolve() == out.resolve() or Path(cfg.base).resolve() == out.resolve():
        raise ConfigError("OUT must differ from BASE and ADAPTER")
    plans = plan_adapter_merge(base, adapter, str(cfg.base), dtype, allow_nonfinite=cfg.allow_nonfinite)
    summary = adapter_summary(adapter)
    shard_size = parse_bytes(cfg.shard_size, "--shard-size")
    report = {
        "base": str(cfg.base), "adapter": str(cfg.adapter), "out": str(out), **summary,
        "num_tensors": len(plans), "num_parameters": sum(p.numel for p in plans),
        "output_bytes": sum(p.nbytes for p in plans), "num_shards": len(assign_shards(plans, shard_size)),
        "output_dtype": dtype or "as the base", "dry_run": cfg.dry_run,
    }
    if cfg.dry_run:
        return report
    config = dict(base.config)
    set_config_dtype(config, dtype)
    provenance = dict(_read_provenance(base.folder))
    provenance["merge_adapter"] = {"base": str(cfg.base), "adapter": str(cfg.adapter), **summary,
                                   "upstack_version": __version__}
    with merge_threads():
        write_surgery_output(
            plans, out, config=config, provenance=provenance, model_card=_model_card(cfg, summary, base.config),
            aux_from=base.folder, shard_size=shard_size, overwrite=cfg.overwrite,
            metadata={"upstack_merge": "lora-adapter"}, progress=not cfg.quiet,
        )
    return report


def _read_provenance(folder: Path) -> dict:
    """The base's upstack.json (e.g. an up-scaled base's layer map), carried forward."""
    p = folder / "upstack.json"
    try:
        value = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}
    except (OSError, ValueError):
        value = {}
    return value if isinstance(value, dict) else {}

