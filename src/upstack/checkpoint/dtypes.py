"""Tensor dtypes as safetensors names them: byte sizes, user-facing aliases, torch names."""

from __future__ import annotations

from upstack.errors import UpstackError

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
# user-facing dtype names (--dtype) -> safetensors name
DTYPE_ALIASES = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}
# safetensors name -> torch dtype name (for computed tensors and config.json "dtype")
TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}


def normalize_dtype(name: str) -> str:
    """'bf16' / 'bfloat16' / 'BF16' -> 'BF16'; raise ConfigError-like UpstackError for unknown names."""
    key = name.strip()
    if key.upper() in DTYPE_SIZES:
        return key.upper()
    if key.lower() in DTYPE_ALIASES:
        return DTYPE_ALIASES[key.lower()]
    raise UpstackError(f"unknown dtype {name!r} (use one of float32, bfloat16, float16)")
