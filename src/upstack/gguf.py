"""`upstack import`: a GGUF file (llama.cpp's format, usually quantized) into a plain Hugging Face folder.

transformers reads the GGUF: its config, its tokenizer (with the chat template) and its tensors,
dequantized from the file's quantization types (Q4_1, Q8_0, ...) into `dtype`. transformers refuses to
save a model it loaded from a GGUF, so the tensors go through upstack's own writer and output gate
(sharded safetensors + index, written into a temporary sibling and renamed when complete), with
config.json, the tokenizer files, generation_config.json, README.md and upstack.json. Both record that
the weights were dequantized from the named quantization: they are not the original weights.

Everything that can be checked from the file's header is checked before any tensor is read: that the
`gguf` package is installed, that the file is a complete GGUF, that transformers can map its
architecture and dequantize every tensor type in it. Memory: the model in `dtype` (transformers
dequantizes the whole file before the writer streams it out).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import tempfile
from pathlib import Path

from upstack import __version__
from upstack.checkpoint import (
    DTYPE_SIZES,
    TORCH_DTYPE_NAMES,
    TensorPlan,
    check_surgery_output,
    model_card_front_matter,
    normalize_dtype,
    set_config_dtype,
    tensor_to_bytes,
    write_surgery_output,
)
from upstack.config import parse_bytes
from upstack.errors import CheckpointError, ConfigError, UpstackError

FLOAT_DTYPES = ("F32", "BF16", "F16")
GGUF_FLOAT_TYPES = {"F32", "F16", "BF16"}
# transformers' legacy GGUF loader renames these llama.cpp architectures before it looks them up
LEGACY_RENAMES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss",
                  "minimax-m2": "minimax_m2", "t5encoder": "t5"}
INSTALL_HINT = "pip install upstack[gguf]"


@dataclasses.dataclass
class ImportConfig:
    """Options of `upstack import` (CLI flags and recipe keys are the same names)."""

    source: str                     # a .gguf file
    out: str
    dtype: str = "bfloat16"         # the dtype the dequantized weights are written in
    shard_size: str = "5GB"
    overwrite: bool = False
    dry_run: bool = False
    quiet: bool = False


def check_import_config(cfg: ImportConfig) -> None:
    """Values only (the file is read when the stage runs): the pipeline runs this before any stage."""
    parse_bytes(cfg.shard_size, "--shard-size")
    try:
        dtype = normalize_dtype(cfg.dtype)
    except UpstackError:
        dtype = None
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r}: the weights are written as float32, bfloat16 or float16")


@dataclasses.dataclass
class GGUFInfo:
    """What the file's header says: enough to check it and to record where the weights came from."""

    path: Path
    size: int
    architecture: str
    name: str | None
    quantization: str               # the file type (general.file_type), e.g. Q4_1
    tensor_types: dict[str, int]    # ggml type name -> number of tensors stored in it
    num_parameters: int
    num_tensors: int


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise UpstackError(f"reading a GGUF file needs the gguf package: {INSTALL_HINT}") from None
    return gguf


def _field(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except (ValueError, IndexError, TypeError):
        return None


def _quantization(gguf, file_type, types: collections.Counter) -> str:
    """The file type's name (MOSTLY_Q4_1 -> Q4_1); without one, the most common quantized tensor type."""
    if isinstance(file_type, int):
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    quantized = [(n, t) for t, n in types.items() if t not in GGUF_FLOAT_TYPES]
    return max(quantized)[1] if quantized else max((n, t) for t, n in types.items())[1]


def read_gguf_info(path: str | Path) -> GGUFInfo:
    """The header of a GGUF file, read and checked without reading any tensor: one line (CheckpointError)
    for a missing, foreign, truncated or corrupt file."""
    gguf = _require_gguf()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # numpy and struct errors of every kind on a short or damaged file
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({size:,} bytes; the reader stopped "
                              f"with {type(e).__name__}: {str(e).splitlines()[0] if str(e) else '-'})") from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)  # absolute offsets
    if end > size:
        raise CheckpointError(f"{path}: truncated GGUF file: its tensors end at byte {end:,}, the file has "
                              f"{size:,} bytes")
    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise CheckpointError(f"{path}: the GGUF header names no architecture (general.architecture)")
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    name = _field(reader, "general.name")
    return GGUFInfo(path, size, architecture, name if isinstance(name, str) else None,
                    _quantization(gguf, _field(reader, "general.file_type"), types), dict(types),
                    sum(int(t.n_elements) for t in reader.tensors), len(reader.tensors))


def _transformers_path(architecture: str) -> str | None:
    """How transformers loads this llama.cpp architecture: 'packed' (its GGUF quantizer), 'legacy'
    (load_gguf_checkpoint), or None when it cannot."""
    from transformers.integrations.gguf.utils import is_gguf_arch_supported
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if is_gguf_arch_supported(architecture):
        return "packed"
    legacy = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}
    return "legacy" if {architecture, LEGACY_RENAMES.get(architecture)} & legacy else None


def supported_architectures() -> list[str]:
    from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted((set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}) | set(GGUF_ARCHS))


def _can_dequantize(type_name: str, how: str) -> bool:
    """Whether the loader transformers takes for this file dequantizes tensors of this ggml type: its own
    kernels for the packed path, the gguf package's for the legacy one (probed on one zero block)."""
    import numpy as np

    gguf = _require_gguf()
    if type_name in GGUF_FLOAT_TYPES:
        return True
    qtype = gguf.GGMLQuantizationType[type_name]
    if how == "packed":
        from transformers.integrations.gguf.dequant import GGML_BLOCK

        return int(qtype) in GGML_BLOCK
    block = gguf.GGML_QUANT_SIZES.get(qtype)
    if block is None:
        return False
    try:
        gguf.quants.dequantize(np.zeros((1, block[1]), dtype=np.uint8), qtype)
    except (NotImplementedError, KeyError, ValueError):
        return False
    return True


def check_gguf(info: GGUFInfo) -> str:
    """Refuse, in one line, a file transformers cannot load: an architecture it cannot map, a tensor type
    it cannot dequantize. Returns the loader path."""
    how = _transformers_path(info.architecture)
    if how is None:
        raise CheckpointError(f"{info.path}: GGUF architecture {info.architecture!r} is not one transformers can "
                              f"load (it maps: {', '.join(supported_architectures())})")
    bad = sorted(t for t in info.tensor_types if not _can_dequantize(t, how))
    if bad:
        counts = ", ".join(f"{t} ({info.tensor_types[t]} tensors)" for t in bad)
        raise CheckpointError(f"{info.path}: quantization type {counts} cannot be dequantized by transformers "
                              f"(architecture {info.architecture!r}); convert the GGUF to a supported type first")
    return how


def _load(info: GGUFInfo, dtype: str):
    """(model, tokenizer) from the GGUF through transformers, every tensor dequantized to `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, file = str(info.path.parent), str(info.path.resolve())
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=getattr(torch, TORCH_DTYPE_NAMES[dtype]), trust_remote_code=False,
            quantization_config=GgufConfig(dequantize=True), output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, NotImplementedError) as e:
        raise CheckpointError(f"{info.path}: transformers cannot load this GGUF "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        raise CheckpointError(f"{info.path}: the GGUF holds no tensor for {len(missing)} of the model's weights "
                              f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); they would be random")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{info.path}: cannot build the tokenizer from the GGUF "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return model, tokenizer


def tensor_plans(model) -> tuple[list[TensorPlan], list[str]]:
    """A plan per tensor of the model's state dict, in its order; a tensor that shares its storage with an
    earlier one (tied embeddings: lm_head is embed_tokens) is left out, as save_pretrained does. Returns
    (plans, names left out)."""
    plans, tied, seen = [], [], set()
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.stride())
        if key in seen:
            tied.append(name)
            continue
        seen.add(key)
        dtype = next(k for k, v in TORCH_DTYPE_NAMES.items() if v == str(t.dtype).removeprefix("torch."))
        plans.append(TensorPlan(name, dtype, tuple(t.shape), compute=lambda t=t: [tensor_to_bytes(t)],
                                description="dequantized from the GGUF"))
    return plans, tied


def _dequantized(info: GGUFInfo) -> bool:
    """Whether any tensor was stored quantized (a file of F32/F16/BF16 values only is converted, not dequantized)."""
    return any(t not in GGUF_FLOAT_TYPES for t in info.tensor_types)


def model_card(cfg: ImportConfig, info: GGUFInfo, config: dict, num_params: int) -> str:
    types = ", ".join(f"{n} {t}" for t, n in sorted(info.tensor_types.items(), key=lambda kv: -kv[1]))
    lines = [
        *model_card_front_matter(info.path.name, ["upstack", "gguf", "dequantized", info.quantization],
                                 Path(cfg.out).name),
        f"Imported by upstack {__version__} from the GGUF file `{info.path.name}` ({info.architecture}"
        + (f", \"{info.name}\"" if info.name else "") + f"): {config.get('num_hidden_layers')} layers, "
        f"{num_params:,} parameters, written as {TORCH_DTYPE_NAMES[normalize_dtype(cfg.dtype)]}.", "",
    ]
    if _dequantized(info):
        lines += [f"**These are not the original weights.** They were dequantized from the file's "
                  f"**{info.quantization}** quantization (tensors: {types}), so they carry its rounding error; a "
                  "model trained from them starts from the quantized model, not from the one it was quantized from.", ""]
    else:
        lines += [f"The file holds unquantized {info.quantization} values (tensors: {types}); they were converted "
                  "as they are.", ""]
    return "\n".join(lines)


def import_gguf(cfg: ImportConfig) -> dict:
    """Run `upstack import`: check the file's header, then (unless dry_run) load it through transformers
    and stream its tensors into `cfg.out`."""
    check_import_config(cfg)
    check_surgery_output(cfg.out, cfg.overwrite, cfg.dry_run)
    dtype = normalize_dtype(cfg.dtype)
    shard_size = parse_bytes(cfg.shard_size, "--shard-size")
    info = read_gguf_info(cfg.source)
    how = check_gguf(info)
    report = {"source": str(cfg.source), "out": str(cfg.out), "architecture": info.architecture,
              "quantization": info.quantization, "tensor_types": info.tensor_types,
              "gguf_tensors": info.num_tensors, "num_parameters": info.num_parameters, "dtype": dtype,
              "output_bytes": info.num_parameters * DTYPE_SIZES[dtype], "loader": how, "dry_run": cfg.dry_run}
    if cfg.dry_run:
        return report
    model, tokenizer = _load(info, dtype)
    plans, tied = tensor_plans(model)
    model.config.architectures = [type(model).__name__]
    config = json.loads(model.config.to_json_string(use_diff=True))
    config.pop("_name_or_path", None)
    set_config_dtype(config, dtype)
    num_params = sum(p.numel for p in plans)
    report.update({"model_type": config.get("model_type"), "num_hidden_layers": config.get("num_hidden_layers"),
                   "num_parameters": num_params, "output_bytes": sum(p.nbytes for p in plans),
                   "num_tensors": len(plans), "tied": tied,
                   "tie_word_embeddings": bool(config.get("tie_word_embeddings"))})
    import gguf
    import transformers

    provenance = {"import": {
        "source": str(cfg.source), "format": "gguf", "source_bytes": info.size, "architecture": info.architecture,
        "name": info.name, "quantization": info.quantization, "tensor_types": info.tensor_types,
        "dequantized": _dequantized(info), "dtype": TORCH_DTYPE_NAMES[dtype],
        "note": (f"weights dequantized from {info.quantization}: not the original weights" if _dequantized(info)
                 else f"weights converted from unquantized {info.quantization} values"),
        "upstack_version": __version__, "transformers_version": transformers.__version__,
        "gguf_version": getattr(gguf, "__version__", None) or _dist_version("gguf"),
    }}
    with tempfile.TemporaryDirectory(prefix="upstack-import-") as aux:
        tokenizer.save_pretrained(aux)
        model.generation_config.save_pretrained(aux)
        write_surgery_output(plans, cfg.out, config=config, provenance=provenance,
                             model_card=model_card(cfg, info, config, num_params), aux_from=aux,
                             shard_size=shard_size, overwrite=cfg.overwrite, progress=not cfg.quiet)
    return report


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None
