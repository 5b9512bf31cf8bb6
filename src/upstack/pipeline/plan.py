"""The `--dry-run` plan: each stage with its status and a size/memory estimate, no weights read.

Estimates are made by the planner, one small function per stage type, because most of them need the
estimate of the stage that makes their input (an up-scale of the base stage's model, a DPO of the SFT
stage's model): they walk the recipe in order, each given the estimates made so far.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from upstack.arch import get_arch, num_layers, remap_config
from upstack.base import BaseConfig, model_config_dict
from upstack.checkpoint import DTYPE_SIZES, normalize_dtype, read_config
from upstack.config import config_from_dict
from upstack.errors import UpstackError
from upstack.hub import KNOWN_CONFIGS
from upstack.pipeline.fingerprint import stage_done
from upstack.pipeline.recipe import Recipe, Stage
from upstack.pipeline.stages import STAGE_TYPES, field_names, load_ref
from upstack.train.memory import gpus_needed, stage_memory_plan
from upstack.upscale import (
    UpscaleConfig,
    count_parameters_from_config,
    make_layer_plan,
    upscale,
)


BASE_VOCAB_SIZE = 512            # the base stage's tokenizer does not exist before the run: the demo's size
GPU_SIZES_GB = (24, 80)          # the dry run says how many GPUs of these sizes each training method needs
INFERENCE_BYTES_PER_PARAM = 2    # bf16 weights
MODEL_KEYS = ("num_parameters", "config", "num_hidden_layers")  # what a stage inherits from its input model

Estimates = dict[str, dict]      # stage name -> its estimate, for the stages planned so far


def _layers(cfg: dict) -> int:
    return num_layers(cfg, get_arch(cfg, True))


def _remapped_config(cfg: dict, opts: dict) -> dict:
    """The config.json an upscale stage with options `opts` writes from a source with config `cfg`."""
    arch = get_arch(cfg, True)
    plan = make_layer_plan(num_layers(cfg, arch), opts.get("method", "dus"), opts.get("m"), opts.get("layers"),
                           opts.get("every"))
    return remap_config(cfg, arch, plan.layer_map)[0]


@contextlib.contextmanager
def _config_folder_for(source: str) -> Iterator[Path | None]:
    """A folder holding the config.json of `source` (a local checkpoint, or a KNOWN_CONFIGS hub id), or None."""
    p = Path(source).expanduser()
    if (p / "config.json").is_file():
        yield p
    elif source in KNOWN_CONFIGS:
        with tempfile.TemporaryDirectory(prefix="upstack-known-") as d:
            (Path(d) / "config.json").write_text(json.dumps(KNOWN_CONFIGS[source]))
            yield Path(d)
    else:
        yield None


def _input_estimate(st: Stage, recipe: Recipe, sizes: Estimates, value: Any) -> dict | None:
    """The estimate of the earlier stage whose folder is `value` (a model option), if any."""
    dep = next((d for d in st.deps if value and str(recipe.stages[d].folder) == str(value)), None)
    return sizes.get(dep) if dep else None


def _model_input(opts: dict) -> Any:
    model = opts.get("model") or (opts.get("models") or [None])[0]
    return model.get("model") if isinstance(model, dict) else model


def estimate_base(st: Stage, recipe: Recipe, sizes: Estimates) -> dict:
    """A model of the configured shape, saved in float32."""
    try:
        cfg = model_config_dict(config_from_dict(BaseConfig, st.resolved, "base"), vocab_size=BASE_VOCAB_SIZE)
    except Exception:  # estimate only
        return {}
    p = count_parameters_from_config(cfg)
    return {"config": cfg, "num_parameters": p, "num_hidden_layers": _layers(cfg), "disk_bytes": p * 4}


def estimate_import(st: Stage, recipe: Recipe, sizes: Estimates) -> dict:
    """From the GGUF's header (no tensor read): its parameters, written in the stage's dtype."""
    from upstack.checkpoint import DTYPE_SIZES, normalize_dtype
    from upstack.gguf import read_gguf_info

    info = read_gguf_info(st.resolved["source"])
    dtype = normalize_dtype(str(st.resolved.get("dtype", "bfloat16")))
    return {"num_parameters": info.num_parameters, "disk_bytes": info.num_parameters * DTYPE_SIZES[dtype]}


def estimate_upscale(st: Stage, recipe: Recipe, sizes: Estimates) -> dict:
    """From the source stage's estimated config; else from the source folder's config.json (a dry-run upscale)."""
    opts = st.resolved
    src = _input_estimate(st, recipe, sizes, opts["source"])
    if src and "config" in src:
        new = _remapped_config(src["config"], opts)
        p = count_parameters_from_config(new)
        return {"config": new, "num_parameters": p, "num_hidden_layers": _layers(new), "disk_bytes": p * 4}
    with _config_folder_for(opts["source"]) as cfg_dir:
        if cfg_dir is None:
            return {}
        known = {k: v for k, v in opts.items() if k in field_names(UpscaleConfig)}
        # every seam gives the same depth and size: estimate SOLAR's cut rather than run the seam's analysis
        known.update(seam="solar", calibration=None, perplexity=None)
        rep = upscale(UpscaleConfig(**{**known, "source": str(cfg_dir), "dry_run": True}))
        return {"num_hidden_layers": rep["num_hidden_layers"], "num_parameters": rep["num_parameters"],
                "disk_bytes": rep["output_bytes"], "config": _remapped_config(read_config(cfg_dir), opts)}


def _local_model(source) -> dict:
    """The estimate of a model named by folder (or a KNOWN_CONFIGS hub id) rather than by an earlier stage:
    parameters from its config.json, disk size from its weight files (else 4 bytes a parameter)."""
    if not isinstance(source, str):
        return {}
    with _config_folder_for(source) as folder:
        if folder is None:
            return {}
        cfg = read_config(folder)
        p = count_parameters_from_config(cfg)
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        return {"config": cfg, "num_parameters": p, "num_hidden_layers": _layers(cfg), "disk_bytes": weights or p * 4}


def _inherit(st: Stage, recipe: Recipe, sizes: Estimates, keys: tuple[str, ...]) -> dict:
    src = _input_estimate(st, recipe, sizes, _model_input(st.resolved)) or {}
    return {k: src[k] for k in keys if k in src}


def training_memory(st: Stage, config: dict) -> dict:
    """The training stage's memory plan (train.memory) from its options and its input model's config:
    {"train_method", "train_memory_bytes" (the stage's own method), "memory": {method: {total, gpus}}}."""
    cfg = config_from_dict(load_ref(STAGE_TYPES[st.type].config), st.resolved, f"stage {st.name!r}")
    plan = stage_memory_plan(cfg, st.type, config)
    method = "qlora" if cfg.qlora else "lora" if cfg.lora else "full"
    memory = {}
    for name, entry in plan["methods"].items():
        sharded = entry["weights"] + entry["gradients"] + entry["optimizer"]
        memory[name] = {"total": entry["total"],
                        **{f"gpus_{gb}gb": gpus_needed(sharded, entry["activations"] + entry["logits"], gb * 10**9)
                           for gb in GPU_SIZES_GB}}
    return {"train_method": method, "train_memory_bytes": plan["methods"][method]["total"], "memory": memory}


def checkpoint_bytes(num_parameters: int, opts: dict) -> int:
    """The resumable checkpoints a training stage keeps in its work folder at once: each holds the weights
    as trained (fp32, or bf16 with dtype: bf16) and, unless LoRA, two fp32 Adam moments per parameter;
    save_total_limit of them, plus the one being written before the oldest is dropped (one only, on
    Ctrl-C, when save_steps is 0)."""
    weight = 2 if str(opts.get("dtype", "fp32")).lower() in ("bf16", "bfloat16") else 4
    lora = opts.get("lora") or opts.get("qlora")
    per_param = weight + (0 if lora else 8)
    copies = int(opts.get("save_total_limit", 2)) + 1 if opts.get("save_steps", 500) else 1
    return num_parameters * per_param * copies


CHARS_PER_TOKEN = 3  # a conservative average (English text runs at about 4 bytes per token)


def token_cache_bytes(opts: dict, vocab_size: int | None) -> int:
    """pretrain's token files (training and eval text): about one token per CHARS_PER_TOKEN bytes of the
    local data files, at 2 bytes a token (4 when the vocabulary passes 65,536)."""
    total = 0
    for item in list(opts.get("data") or []) + list(opts.get("eval_data") or []):
        path = Path(str(item.get("path") if isinstance(item, dict) else item).split(":", 1)[0]).expanduser()
        files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else []
        total += sum(f.stat().st_size for f in files)
    return total // CHARS_PER_TOKEN * (4 if (vocab_size or 0) > 1 << 16 else 2)


def estimate_training(st: Stage, recipe: Recipe, sizes: Estimates) -> dict:
    """pretrain, sft, dpo: the input model's size (saved in its dtype) and the training memory plan of
    train.memory for full, LoRA and QLoRA training (docs/training.md gives the formula). work_bytes: what
    the work folder holds besides (resumable checkpoints, pretrain's token files)."""
    info = _inherit(st, recipe, sizes, MODEL_KEYS + ("disk_bytes",)) or _local_model(_model_input(st.resolved))
    if "num_parameters" in info:
        if info.get("config"):
            info.update(training_memory(st, info["config"]))
        info["work_bytes"] = checkpoint_bytes(info["num_parameters"], st.resolved)
        if st.type == "pretrain":
            info["work_bytes"] += token_cache_bytes(st.resolved, (info.get("config") or {}).get("vocab_size"))
    return info


def disk_need(est: dict) -> int:
    """What a stage needs free while it runs: its output plus its work folder."""
    return int(est.get("disk_bytes") or 0) + int(est.get("work_bytes") or 0)


def estimate_merge(st: Stage, recipe: Recipe, sizes: Estimates) -> dict:
    """The first model's size (saved in its dtype)."""
    return _inherit(st, recipe, sizes, MODEL_KEYS + ("disk_bytes",))


def estimate_merge_adapter(st: Stage, recipe: Recipe, sizes: Estimates) -> dict:
    """The merged model: the base's tensors, so the base's size (an earlier stage's estimate, or the base
    folder's weight files), or its parameters in `dtype` when the stage sets one."""
    base = st.resolved.get("base")
    info = _input_estimate(st, recipe, sizes, base) or _local_model(base)
    info = {k: info[k] for k in MODEL_KEYS + ("disk_bytes",) if k in info}
    if st.resolved.get("dtype") and "num_parameters" in info:
        info["disk_bytes"] = info["num_parameters"] * DTYPE_SIZES[normalize_dtype(str(st.resolved["dtype"]))]
    return info


def estimate_inference(st: Stage, recipe: Recipe, sizes: Estimates) -> dict:
    """eval, contamination: bf16 weights (contamination also holds the reference model)."""
    info = _inherit(st, recipe, sizes, MODEL_KEYS)
    if "num_parameters" in info:
        models = 2 if st.type == "contamination" else 1
        info["inference_memory_bytes"] = info["num_parameters"] * INFERENCE_BYTES_PER_PARAM * models
    return info


def estimate_model_user(st: Stage, recipe: Recipe, sizes: Estimates) -> dict:
    """synth-math: the size of the model it generates with."""
    return _inherit(st, recipe, sizes, MODEL_KEYS)


ESTIMATORS: dict[str, Callable[[Stage, Recipe, Estimates], dict]] = {
    "base": estimate_base, "import": estimate_import, "upscale": estimate_upscale,
    "pretrain": estimate_training, "sft": estimate_training, "dpo": estimate_training,
    "merge": estimate_merge, "merge-adapter": estimate_merge_adapter,
    "eval": estimate_inference, "contamination": estimate_inference,
    "synth-math": estimate_model_user,
}


def estimate_stage(st: Stage, recipe: Recipe, sizes: Estimates) -> dict:
    """Parameters, disk and memory estimate of a stage for --dry-run (best effort, no weights read)."""
    estimator = ESTIMATORS.get(st.type)
    return estimator(st, recipe, sizes) if estimator else {}


def plan_recipe(recipe: Recipe) -> list[dict]:
    """The --dry-run plan: each stage with status, inputs, and size/memory estimates."""
    sizes: Estimates = {}
    rows = []
    will_run: set[str] = set()
    for st in recipe.stages.values():
        try:
            est = estimate_stage(st, recipe, sizes)
        except UpstackError as e:
            est = {"note": str(e)}
        sizes[st.name] = est
        # a stage after one that will run gets new inputs, so it runs too
        done = not (set(st.deps) & will_run) and stage_done(st, recipe)
        if not done:
            will_run.add(st.name)
        rows.append({
            "stage": st.name, "type": st.type, "deps": st.deps, "folder": str(st.folder),
            "done": done,
            **{k: v for k, v in est.items() if k != "config"},
        })
    return rows
