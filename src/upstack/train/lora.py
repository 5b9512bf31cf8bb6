"""LoRA and QLoRA: train low-rank adapters (PEFT) instead of the full model, on a base held in full
precision (--lora) or in 4-bit NF4 with double quantization (--qlora, bitsandbytes), as in the QLoRA paper.

Which linear modules get adapters is resolved here, by name, from the loaded model: `all-linear` (every
linear module but the output head, PEFT's convention) or short names such as `q_proj,v_proj`, limited to
the decoder layers `--train-layers` selects (`new` after an interleave up-scale: LLaMA-Pro style). The
adapter is saved in PEFT's own format; the stage's full output is the adapter merged into the base
checkpoint on disk by checkpoint's streaming adapter plan (never into the 4-bit copy).
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from typing import Any, Optional, Union

from upstack.errors import ConfigError
from upstack.train.layers import decoder_layers, new_layers, parse_train_layers

# bitsandbytes (imported by peft) logs a warning on import when an optional CPU kernel package is absent;
# it runs without it, so the line is noise for every LoRA run.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

ALL_LINEAR = "all-linear"
ADAPTER_DIR = "adapter"   # OUT/adapter: the PEFT adapter folder


def lora_enabled(cfg) -> bool:
    return bool(cfg.lora or cfg.qlora)


def _names(value: Union[str, list, None]) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(x).strip() for x in items if str(x).strip()]


def lora_target_names(value: Union[str, list, None]) -> list[str]:
    """--lora-targets as a list of short module names (or [all-linear])."""
    return _names(value)


def lora_alpha(cfg) -> float:
    return float(cfg.lora_alpha) if cfg.lora_alpha is not None else 2.0 * cfg.lora_r


def lora_problems(cfg, dtype: Optional[str]) -> list[str]:
    """Values only (no file, no import): what cannot combine. `dtype` is the canonical --dtype (fp32,
    bf16, bf16-mixed). The pipeline runs this (through check_config) before any stage."""
    problems = []
    if cfg.lora_r < 1:
        problems.append(f"lora_r: must be >= 1, got {cfg.lora_r}")
    if cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
        problems.append(f"lora_alpha: must be > 0, got {cfg.lora_alpha}")
    if not 0 <= cfg.lora_dropout < 1:
        problems.append(f"lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    if not _names(cfg.lora_targets):
        problems.append("lora_targets: name at least one module (or all-linear)")
    if cfg.adapter_only and not lora_enabled(cfg):
        problems.append("adapter_only: needs --lora or --qlora (a full fine-tune has no adapter)")
    if cfg.qlora:
        if dtype == "fp32":
            problems.append("qlora: the 4-bit base computes in bf16; pass --dtype bf16 (or bf16-mixed), "
                            "not fp32")
        if importlib.util.find_spec("bitsandbytes") is None:
            problems.append("qlora: bitsandbytes is not installed (pip install 'upstack[qlora]', or bitsandbytes>=0.50); "
                            "--lora trains adapters on the full-precision base without it")
    if lora_enabled(cfg) and importlib.util.find_spec("peft") is None:
        problems.append("lora: peft is not installed (pip install 'peft>=0.21')")
    return problems


def quantization_config(cfg):
    """transformers' BitsAndBytesConfig for --qlora (NF4, double quantization, bf16 compute), else None."""
    if not cfg.qlora:
        return None
    import torch
    from transformers import BitsAndBytesConfig


    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def _is_linear(module) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def _layer_indices(model, spec, model_dir: str) -> Optional[list[int]]:
    """Decoder-layer indices --train-layers selects (None: all), with the layer-list prefix."""
    layers = parse_train_layers(spec, None)
    if layers is None:
        return None
    _, n = decoder_layers(model)
    return new_layers(model_dir, n) if layers == "new" else parse_train_layers(layers, n)


def target_modules(model, cfg, model_dir: str) -> tuple[list[str], Optional[list[int]]]:
    """(full names of the linear modules that get adapters, the layers they are limited to or None)."""
    wanted = _names(cfg.lora_targets)
    layers = _layer_indices(model, cfg.train_layers, model_dir)
    prefixes = None
    if layers is not None:
        prefix, _ = decoder_layers(model)
        prefixes = tuple(f"{prefix}.{i}." for i in layers)
    head = model.get_output_embeddings()
    found, linear_names = [], set()
    for name, mod in model.named_modules():
        if not name or not _is_linear(mod) or mod is head:
            continue
        short = name.rsplit(".", 1)[-1]
        linear_names.add(short)
        if wanted != [ALL_LINEAR] and short not in wanted:
            continue
        if prefixes is not None and not name.startswith(prefixes):
            continue
        found.append(name)
    unknown = [w for w in wanted if w != ALL_LINEAR and w not in linear_names]
    if unknown or not found:
        where = f" in layers {cfg.train_layers}" if layers is not None else ""
        raise ConfigError(f"--lora-targets {','.join(wanted)}: names no linear module of the model{where}"
                          f"{' (unknown: ' + ', '.join(unknown) + ')' if unknown else ''}; its linear modules are "
                          f"{', '.join(sorted(linear_names))}")
    return found, layers


def rank_problem(r: int, shapes: dict[str, tuple[int, int]]) -> Optional[str]:
    """Why rank `r` cannot adapt the layers `shapes` ({name: (in_features, out_features)}), or None: a
    rank above min(in, out) of a layer adds parameters without adding rank (PEFT would allocate them all:
    r = 1e11 fails allocating after the model is loaded)."""
    if not shapes:
        return None
    name, (n_in, n_out) = min(shapes.items(), key=lambda kv: min(kv[1]))
    bound = min(n_in, n_out)
    if r <= bound:
        return None
    return (f"lora_r: {r} is more than the adapted layers allow: the rank must be <= min(in, out) of each "
            f"adapted layer, and {name} maps {n_in} -> {n_out}, so r <= {bound} here")


def _check_modules_to_save(model, names: list[str]) -> None:
    present = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    missing = [n for n in names if n not in present]
    if missing:
        raise ConfigError(f"--lora-modules-to-save: the model has no module {', '.join(missing)} "
                          "(e.g. embed_tokens, lm_head)")


def _tied_embedding_names(model) -> Optional[tuple[str, str]]:
    """(short name of the input embedding, of the output head) when the head's weight is the embedding's
    (tie_word_embeddings), else None."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None or getattr(head, "weight", None) is not getattr(emb, "weight", None):
        return None
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n}
    return names[id(emb)], names[id(head)]


def _keeps_tie(model, to_save: list[str]) -> bool:
    """True when --lora-modules-to-save names the embedding or the head of a model that ties them: PEFT then
    trains one copy that both use (ensure_weight_tying), as the base does, so that the merged checkpoint
    (which stores the embedding only) computes what was trained."""
    tied = _tied_embedding_names(model)
    if tied is None or not set(tied) & set(to_save):
        return False
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    if not set(tied) <= set(EMBEDDING_LAYER_NAMES):
        raise ConfigError(f"--lora-modules-to-save {','.join(to_save)}: this model ties its output head "
                          f"{tied[1]} to its embedding {tied[0]}, and PEFT can keep that tie only for modules "
                          f"named {' and '.join(EMBEDDING_LAYER_NAMES)}; train without saving them whole, or "
                          "untie the model first")
    return True


def parameter_count(model) -> int:
    """The model's parameters, a 4-bit quantized weight counted by its original shape (bitsandbytes packs two
    4-bit values in each stored byte, so numel() would count half of them)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += state.shape.numel() if state is not None and hasattr(state, "shape") else p.numel()
    return total


def apply_lora(model, cfg, model_dir: str) -> tuple[Any, dict]:
    """Wrap `model` with LoRA adapters (all base weights frozen); return (peft model, run info)."""
    import torch
    from peft import LoraConfig, get_peft_model

    targets, layers = target_modules(model, cfg, model_dir)
    modules = dict(model.named_modules())
    problem = rank_problem(cfg.lora_r, {n: (modules[n].in_features, modules[n].out_features) for n in targets})
    if problem:
        raise ConfigError(problem)
    to_save = _names(cfg.lora_modules_to_save)
    _check_modules_to_save(model, to_save)
    # No peft.prepare_model_for_kbit_training for QLoRA: it would cast every frozen bf16 weight the 4-bit
    # quantization left (embeddings, head, norms) up to fp32 -- twice their memory, for weights that never
    # change -- and enable gradient checkpointing, which train/model.py does for every run.
    for p in model.parameters():
        p.requires_grad_(False)
    tie = _keeps_tie(model, to_save)
    lc = LoraConfig(r=cfg.lora_r, lora_alpha=lora_alpha(cfg), lora_dropout=cfg.lora_dropout,
                    target_modules=targets, modules_to_save=to_save or None, use_rslora=cfg.use_rslora,
                    use_dora=cfg.use_dora, bias="none", task_type="CAUSAL_LM", ensure_weight_tying=tie)
    total = parameter_count(model)
    torch.manual_seed(cfg.seed)  # the adapters' initialisation depends on --seed alone
    with warnings.catch_warnings():  # PEFT calls a transformers API that warns about its own deprecation
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(model, lc)
    from upstack.train.lora_cpu import tune_lora_layers

    tune_lora_layers(model, autocast=cfg.dtype == "bf16-mixed")
    if cfg.dtype == "bf16-mixed":  # master weights of what is trained stay fp32 (modules_to_save too)
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {"train_layers": layers if layers is not None else "all", "trainable": trainable, "total": total,
            "lora": {"r": cfg.lora_r, "alpha": lora_alpha(cfg), "dropout": cfg.lora_dropout,
                     "modules": len(targets), "modules_to_save": to_save, "rslora": cfg.use_rslora,
                     "dora": cfg.use_dora, "qlora": bool(cfg.qlora)}}
    return model, info


def peft_model_of(model):
    """The PeftModel inside accelerate/DDP wrappers, or None for a full fine-tune."""
    inner = getattr(model, "module", model)
    return inner if hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config") else None


class AdapterDisabled:
    """The policy with its adapter switched off, as a scoring model: the starting model, without a second
    copy in memory (what TRL does for DPO with a PEFT model)."""

    def __init__(self, model):
        self.model = peft_model_of(model)
        self.training = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, logits_to_keep=0, **kwargs):
        return self(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=logits_to_keep, **kwargs)

    def __call__(self, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        with self.model.disable_adapter():
            return self.model(**kwargs)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self
