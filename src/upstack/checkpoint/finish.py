"""The shared end of a surgery stage (upscale, merge): the output check, config dtype, provenance,
model card, aux files and the atomic write, written once."""

from __future__ import annotations

import json
from pathlib import Path

from upstack.checkpoint.dtypes import TORCH_DTYPE_NAMES
from upstack.checkpoint.writer import TensorPlan, write_checkpoint
from upstack.outputs import check_output_free


def check_surgery_output(out: str | Path | None, overwrite: bool, dry_run: bool) -> None:
    """Refuse an existing output before any work (a dry run writes nothing, so checks nothing)."""
    if out is not None and not dry_run:
        check_output_free(out, overwrite)


def set_config_dtype(config: dict, dtype: str | None) -> None:
    """Record the output dtype (safetensors name) in config.json: `dtype`, and `torch_dtype` where the
    source config had it. No-op without a dtype."""
    if dtype:
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = TORCH_DTYPE_NAMES[dtype]


def model_card_front_matter(base_model: str | list[str], tags: list[str], title: str) -> list[str]:
    """The YAML front matter and title of a model card (README.md), as lines."""
    if isinstance(base_model, str):
        base = [f"base_model: {base_model}"]
    else:
        base = ["base_model:", *[f"- {n}" for n in base_model]]
    return ["---", *base, "tags:", *[f"- {t}" for t in tags], "---", "", f"# {title}", ""]


def write_surgery_output(
    plans: list[TensorPlan],
    out: str | Path,
    *,
    config: dict,
    provenance: dict,
    model_card: str,
    aux_from: str | Path | None,
    shard_size: int,
    overwrite: bool,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Stream `plans` into `out` atomically, with config.json, the aux files of `aux_from`, README.md
    (`model_card`) and upstack.json (`provenance`)."""
    return write_checkpoint(
        plans, out, config=config, aux_from=aux_from, shard_size=shard_size, overwrite=overwrite,
        model_card=model_card, extra_files={"upstack.json": json.dumps(provenance, indent=2) + "\n"},
        metadata=metadata, progress=progress,
    )
