"""The `base` stage: a small model pretrained from scratch (the demo's stand-in for Mistral-7B).

A randomly initialised model of the given architecture and size, with a given tokenizer, is written as a
standard HF folder and then trained by the `pretrain` stage's own function with the options under
`train:`. The init folder is a temporary sibling of the output and is removed at the end.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

from upstack.config import config_from_dict
from upstack.errors import ConfigError
from upstack.outputs import check_output_free
from upstack.train.config import check_config
from upstack.train.pretrain import PretrainConfig, pretrain

# PretrainConfig options the base stage sets itself; `train:` may not set them.
TRAIN_SET_BY_BASE = ("model", "out", "overwrite", "resume")


@dataclasses.dataclass
class BaseConfig:
    tokenizer: str                     # folder with a HF tokenizer (e.g. the synth-data stage's tokenizer/)
    data: list                         # pretraining data specs, as for `upstack pretrain --data`
    out: str
    model_type: str = "mistral"
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False
    seed: int = 0
    train: dict = dataclasses.field(default_factory=dict)  # PretrainConfig options (learning_rate, max_steps, max_length, ...)
    overwrite: bool = False


def model_config_dict(cfg: BaseConfig, vocab_size: int, bos: int = 1, eos: int = 2, pad: int | None = 3) -> dict:
    return {
        "model_type": cfg.model_type, "vocab_size": vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        **({"sliding_window": None} if cfg.model_type == "mistral" else {}),
    }


def init_model(cfg: BaseConfig, folder: Path) -> Path:
    """Write a randomly initialised model (seeded) with the tokenizer to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer)
    except Exception as e:  # transformers raises several types for a bad tokenizer folder
        raise ConfigError(f"base: cannot load tokenizer from {cfg.tokenizer} ({type(e).__name__}: {e})") from None
    d = model_config_dict(cfg, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    model_type = d.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **d)
    except Exception as e:
        raise ConfigError(f"base: cannot build a {model_type!r} config ({e})") from None
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _init_folder(cfg: BaseConfig) -> Path:
    out = Path(cfg.out)
    return out.parent / f".{out.name}.init"


def pretrain_config(cfg: BaseConfig) -> PretrainConfig:
    """The pretraining run of `train:` (PretrainConfig options, less those the base stage sets), validated."""
    set_here = [k for k in TRAIN_SET_BY_BASE if k in cfg.train]
    if set_here:
        raise ConfigError(f"base.train: {', '.join(set_here)} is set by the base stage; remove it")
    train_opts = {"data": cfg.data, "seed": cfg.seed, **cfg.train, "model": str(_init_folder(cfg)),
                  "out": str(Path(cfg.out)), "overwrite": cfg.overwrite, "resume": True}
    return config_from_dict(PretrainConfig, train_opts, where="base.train")


def check_base_config(cfg: BaseConfig) -> None:
    """Value checks that read no file (the recipe loader runs them before any stage): `train:` as a
    pretraining config, types and values."""
    pcfg = pretrain_config(cfg)
    try:
        check_config(pcfg)
    except ConfigError as e:  # name each problem's option as it is written: base.train.learning_rate
        problems = str(e).split("; ")
        raise ConfigError("; ".join(("base.train." if re.match(r"\w+: ", p) else "base.train: ") + p
                                    for p in problems)) from None


def build_base(cfg: BaseConfig) -> dict:
    out = Path(cfg.out)
    check_output_free(out, cfg.overwrite)
    init = _init_folder(cfg)
    pcfg = pretrain_config(cfg)  # validate before any work
    if not (init / "config.json").is_file():
        shutil.rmtree(init, ignore_errors=True)
        init_model(cfg, init)
    result = pretrain(pcfg)
    shutil.rmtree(init, ignore_errors=True)
    return result
