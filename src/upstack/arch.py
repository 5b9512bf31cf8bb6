"""Per-architecture knowledge as data: where the decoder layers live and which config fields are per-layer.

Upscaling renames `model.layers.<i>.*` tensors and must remap every config field that describes
layers individually (layer_types, max_window_layers, ...). Adding an architecture is adding a row.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from upstack.errors import ConfigError, UpstackError

# How a per-layer config field encodes its per-layer values, and so how it is remapped:
#   list       a list with one entry per layer                       -> new[j] = old[map[j]]
#   index_set  a list of layer indices that have a property          -> j in new iff map[j] in old
#   from_k     int k: layers i >= k have the property                -> must stay of that form
#   below_k    int k: layers i <  k have the property                -> must stay of that form
#   period     int p: layer i has the property iff (i + 1) % p == 0  -> must stay of that form
FIELD_KINDS = ("list", "index_set", "from_k", "below_k", "period")


@dataclasses.dataclass(frozen=True)
class LayerField:
    name: str
    kind: str
    # The field has no effect while this config key is false/absent (e.g. qwen2's max_window_layers
    # without use_sliding_window), so an inexpressible remap is written as "no layer" instead of refused.
    inert_unless: str | None = None
    # transformers reads `layer_types` instead when present; an inexpressible remap then drops this field.
    superseded_by_layer_types: bool = False


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    model_type: str
    layer_prefix: str = "model.layers."
    layer_count_key: str = "num_hidden_layers"
    # Zeroing these in a copied block makes it an identity map on the residual stream (LLaMA-Pro).
    residual_out: tuple[str, ...] = ("self_attn.o_proj.weight", "self_attn.o_proj.bias",
                                     "mlp.down_proj.weight", "mlp.down_proj.bias")
    layer_fields: tuple[LayerField, ...] = ()
    # The input embedding is the tensor whose name ends with `embed_suffix`; the output head is
    # `head_name`. A model without a stored head, or with tie_word_embeddings, ties the two.
    embed_suffix: str = "embed_tokens.weight"
    head_name: str = "lm_head.weight"
    # The logits are the head's output as is (no soft-capping or scaling after lm_head), so a loss may apply
    # the head itself, a chunk of positions at a time (lm.token_nll).
    logits_are_head_output: bool = True


LAYER_TYPES = LayerField("layer_types", "list")
_SLIDING_QWEN = LayerField("max_window_layers", "from_k", inert_unless="use_sliding_window",
                           superseded_by_layer_types=True)

ARCHS: dict[str, ArchSpec] = {a.model_type: a for a in [
    ArchSpec("llama", layer_fields=(LAYER_TYPES,)),
    ArchSpec("mistral", layer_fields=(LAYER_TYPES,)),
    ArchSpec("qwen2", layer_fields=(LAYER_TYPES, _SLIDING_QWEN)),
    ArchSpec("qwen3", layer_fields=(LAYER_TYPES, _SLIDING_QWEN)),
    ArchSpec("gemma", layer_fields=(LAYER_TYPES,)),
    ArchSpec("gemma2", layer_fields=(LAYER_TYPES,), logits_are_head_output=False),  # final_logit_softcapping
    ArchSpec("gemma3_text", layer_fields=(
        LAYER_TYPES, LayerField("sliding_window_pattern", "period", superseded_by_layer_types=True)),
             logits_are_head_output=False),
    ArchSpec("phi3", layer_fields=(LAYER_TYPES,)),
    ArchSpec("olmo2", layer_fields=(LAYER_TYPES,)),
    ArchSpec("smollm3", layer_fields=(LAYER_TYPES, LayerField("no_rope_layers", "list"))),
    ArchSpec("mixtral", residual_out=("self_attn.o_proj.weight",), layer_fields=(LAYER_TYPES,)),
    ArchSpec("qwen2_moe", residual_out=("self_attn.o_proj.weight",), layer_fields=(
        LAYER_TYPES, _SLIDING_QWEN, LayerField("mlp_only_layers", "index_set"),
        LayerField("decoder_sparse_step", "period"))),
    ArchSpec("qwen3_moe", residual_out=("self_attn.o_proj.weight",), layer_fields=(
        LAYER_TYPES, _SLIDING_QWEN, LayerField("mlp_only_layers", "index_set"),
        LayerField("decoder_sparse_step", "period"))),
]}
GENERIC = ArchSpec("generic", layer_fields=(LAYER_TYPES,), logits_are_head_output=False)


def get_arch(config: dict, allow_unknown: bool = False) -> ArchSpec:
    """The ArchSpec for a config.json; unknown model types only with allow_unknown (generic pattern)."""
    model_type = config.get("model_type")
    if model_type in ARCHS:
        return ARCHS[model_type]
    if allow_unknown:
        return GENERIC
    known = ", ".join(sorted(ARCHS))
    raise UpstackError(
        f"unsupported architecture model_type={model_type!r} (supported: {known}); "
        "--allow-unknown-arch tries the generic 'model.layers.N.' pattern")


def num_layers(config: dict, arch: ArchSpec) -> int:
    n = config.get(arch.layer_count_key)
    if type(n) is not int or n <= 0:
        raise UpstackError(f"config.json: {arch.layer_count_key} must be a positive integer, got {n!r}")
    return n


def split_layer_name(name: str, arch: ArchSpec) -> tuple[int, str] | None:
    """'model.layers.7.mlp.up_proj.weight' -> (7, 'mlp.up_proj.weight'); None for non-layer tensors."""
    if not name.startswith(arch.layer_prefix):
        return None
    m = re.match(r"(\d+)\.(.+)$", name[len(arch.layer_prefix):])
    return (int(m.group(1)), m.group(2)) if m else None


def layer_name(index: int, rest: str, arch: ArchSpec) -> str:
    return f"{arch.layer_prefix}{index}.{rest}"


def embed_name(tensor_names: Iterable[str], arch: ArchSpec = GENERIC) -> str | None:
    """The input embedding among `tensor_names` (the first ending with arch.embed_suffix), or None."""
    return next((n for n in tensor_names if n.endswith(arch.embed_suffix)), None)


def is_head(name: str, arch: ArchSpec = GENERIC) -> bool:
    """Whether a (possibly prefixed) tensor name is the output head."""
    return name.endswith(arch.head_name)


def tied(config: dict, tensor_names: Iterable[str], arch: ArchSpec = GENERIC) -> bool:
    """The output head is the input embedding: tie_word_embeddings is true, or no head is stored
    (transformers then ties it too)."""
    return config.get("tie_word_embeddings") is True or arch.head_name not in tensor_names


# Layer ranges: "0-23,8-31" (end-inclusive) <-> [0..23, 8..31]

def parse_layer_ranges(text: str, n: int | None = None, *, flag: str = "--layers") -> list[int]:
    """'0-23,8-31' -> [0..23, 8..31] (end-inclusive); single indices allowed ('0-3,3,4-7').

    Indices are checked against an n-layer model when n is given (syntax only when None). Errors
    name `flag` and the text.
    """
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ConfigError(f"{flag} {text!r}: empty range")
        try:
            a, b = (part.split("-", 1) + [None])[:2] if "-" in part else (part, part)
            a, b = int(a), int(b)
        except ValueError:
            raise ConfigError(f"{flag} {text!r}: cannot read {part!r} (use ranges like 0-23,8-31)") from None
        if n is not None and (a < 0 or b < 0 or a > n - 1 or b > n - 1):
            raise ConfigError(f"{flag} {text!r}: layer index out of range in {part!r}; the source has "
                              f"{n} layers (0-{n - 1})")
        if b < a:
            raise ConfigError(f"{flag} {text!r}: range {part!r} runs backwards")
        out.extend(range(a, b + 1))
    return out


def layer_runs(layer_map: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Maximal runs of consecutive output layers copying consecutive source layers, as
    (first output, last output, first source, last source): [0,1,2,1,2] -> [(0,2,0,2), (3,4,1,2)]."""
    runs, start = [], 0
    for k in range(1, len(layer_map) + 1):
        if k == len(layer_map) or layer_map[k] != layer_map[k - 1] + 1:
            runs.append((start, k - 1, layer_map[start], layer_map[k - 1]))
            start = k
    return runs


def format_layer_ranges(values: list[int]) -> str:
    """[0,1,2,3,8,9] -> '0-3,8-9' (the inverse of parse_layer_ranges for increasing runs)."""
    parts, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(f"{values[i]}-{values[j]}" if j > i else str(values[i]))
        i = j + 1
    return ",".join(parts)


def _flags_of(field: LayerField, value, n: int) -> list[bool]:
    if field.kind == "from_k":
        return [i >= value for i in range(n)]
    if field.kind == "below_k":
        return [i < value for i in range(n)]
    if field.kind == "period":
        return [(i + 1) % value == 0 for i in range(n)]
    if field.kind == "index_set":
        return [i in set(value) for i in range(n)]
    raise AssertionError(field.kind)


def _encode(field: LayerField, flags: list[bool]):
    """Inverse of _flags_of for the scalar kinds; None when `flags` has no such form."""
    n = len(flags)
    if field.kind == "from_k":
        k = flags.index(True) if True in flags else n
        return k if flags == [i >= k for i in range(n)] else None
    if field.kind == "below_k":
        k = flags.index(False) if False in flags else n
        return k if flags == [i < k for i in range(n)] else None
    if field.kind == "period":
        for p in range(1, n + 2):
            if flags == [(i + 1) % p == 0 for i in range(n)]:
                return p
        return None
    raise AssertionError(field.kind)


def remap_config(config: dict, arch: ArchSpec, layer_map: Sequence[int]) -> tuple[dict, list[str]]:
    """A copy of `config` for a model whose layer j is source layer layer_map[j].

    Returns (new_config, notes). Raises UpstackError when a per-layer field cannot be remapped
    faithfully (rather than writing a subtly different model).
    """
    n = num_layers(config, arch)
    new = dict(config)
    new[arch.layer_count_key] = len(layer_map)
    notes: list[str] = []
    for field in arch.layer_fields:
        value = config.get(field.name)
        if value is None:
            continue
        where = f"config.json field {field.name!r}"
        if field.kind == "list":
            if not isinstance(value, list) or len(value) != n:
                raise UpstackError(f"{where} must be a list of {n} entries (one per layer), got "
                                   f"{len(value) if isinstance(value, list) else type(value).__name__}")
            new[field.name] = [value[i] for i in layer_map]
            continue
        if field.kind == "index_set":
            if not isinstance(value, list) or not all(type(i) is int for i in value):
                raise UpstackError(f"{where} must be a list of layer indices")
            flags = _flags_of(field, value, n)
            new[field.name] = [j for j, i in enumerate(layer_map) if flags[i]]
            continue
        if type(value) is not int or (field.kind == "period" and value <= 0):
            raise UpstackError(f"{where} must be {'a positive' if field.kind == 'period' else 'an'} integer")
        flags = _flags_of(field, value, n)
        new_flags = [flags[i] for i in layer_map]
        encoded = _encode(field, new_flags)
        if encoded is not None:
            new[field.name] = encoded
            if encoded != value:
                notes.append(f"{field.name}: {value} -> {encoded}")
        elif field.inert_unless and not config.get(field.inert_unless):
            new[field.name] = len(layer_map) if field.kind == "from_k" else value
            notes.append(f"{field.name}: has no effect while {field.inert_unless} is off; set to {new[field.name]}")
        elif field.superseded_by_layer_types and isinstance(config.get("layer_types"), list):
            del new[field.name]
            notes.append(f"{field.name}: dropped (the remapped layer_types says per layer what it encoded)")
        else:
            raise UpstackError(
                f"{where}={value} cannot describe the new layer order faithfully "
                f"(layers with the property would be {[j for j, f in enumerate(new_flags) if f]}); "
                "choose a layer plan that keeps its pattern")
    return new, notes
