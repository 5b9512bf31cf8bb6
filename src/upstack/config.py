"""Typed stage configs: CLI flags and recipe YAML fill the same dataclasses through `config_from_dict`."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from upstack.errors import ConfigError

_SIZE_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_bytes(text: str | int, field: str = "size") -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536870912, 1000 -> 1000. Decimal units as HF uses them."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise ConfigError(f"{field}: cannot read {text!r} as a size (examples: 5GB, 500MB, 2GiB, 1000000)")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise ConfigError(f"{field}: size must be positive, got {text!r}")
    return value


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against a type hint; return it (ints are accepted for floats). Raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            try:
                return _check_type(value, alt, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not a valid value (expected {_type_name(tp)})")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        choices = ", ".join(repr(a) for a in typing.get_args(tp))
        raise ConfigError(f"{where}: {value!r} is not one of {choices}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        out = [_check_type(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and getattr(tp, "FROM_STRING", None):  # a bare name for its main field
            return tp(**{tp.FROM_STRING: value})
        return config_from_dict(tp, value, where)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def config_errors(cls: type, data: dict, where: str = "config") -> list[str]:
    """All problems with `data` as a `cls` config (unknown keys, missing required keys, wrong types)."""
    if not isinstance(data, dict):
        return [f"{where}: expected a mapping of options, got {type(data).__name__}"]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors = []
    unknown = sorted(set(data) - set(fields))
    if unknown:
        errors.append(f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})")
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{where}: missing required option {name!r}")
            continue
        try:
            _check_type(data[name], hints[name], f"{where}.{name}")
        except ConfigError as e:
            errors.append(str(e))
    return errors


def config_from_dict(cls: type, data: dict, where: str = "config"):
    """Build dataclass `cls` from a mapping, validating keys and types; raise one ConfigError for all problems."""
    errors = config_errors(cls, data, where)
    if errors:
        raise ConfigError("; ".join(errors))
    hints = typing.get_type_hints(cls)
    kwargs = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def config_to_dict(cfg) -> dict:
    """A JSON-serialisable dict of a config dataclass (for resolved-config files and skip-if-done)."""
    return dataclasses.asdict(cfg)
