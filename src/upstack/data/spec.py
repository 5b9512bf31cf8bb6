"""How a data source is named: `DataSpec` and its CLI form `PATH[:key=value,...]`, and `NAME=PATH`.

`parse_data_spec` reads the CLI form; recipe YAML fills the same dataclass through `config_from_dict`;
`format_data_spec` writes it back. `split_named` is the one reader of `NAME=VALUE` arguments
(--benchmark/--against NAME=PATH, --task-file TASK=PATH, a recipe's named benchmark paths).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from upstack.data.filters import compile_filter, unquote
from upstack.data.formats import FORMATS
from upstack.errors import ConfigError

TEXT_UNITS = ("paragraph", "line", "file")


@dataclass
class DataSpec:
    """One data source and how to take rows from it (see docs/data.md)."""

    path: str                      # local file or folder (JSONL, JSON array, parquet, CSV/TSV, txt) or a hub id
    format: str | None = None      # adapter name (formats.FORMATS); None = auto-detect from the first row's keys
    split: str | None = None       # folders with split-named files, hub datasets (default: train)
    samples: int | None = None     # exactly this many rows (SFT/DPO: seeded random sample; text: the first N)
    weight: float | None = None    # share of the mixture, proportional to the weights of the other sources
    seed: int = 0                  # seed of this source's sample
    filter: str | None = None      # keep rows for which this expression holds (docs/data.md: filter syntax)
    field: str | None = None       # text data: the field holding the text (default "text")
    text_unit: str | None = None   # .txt files: paragraph | line | file (default: auto, see docs/data.md)
    subset: str | None = None      # hub datasets: the configuration name (e.g. "main" for openai/gsm8k)

    def __post_init__(self):
        where = f"data source {self.path!r}"
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError("data source: path must be a non-empty string")
        if self.format is not None and self.format not in FORMATS and self.format != "text":
            raise ConfigError(f"{where}: unknown format {self.format!r} (known: text, {', '.join(FORMATS)})")
        if self.samples is not None and self.samples <= 0:
            raise ConfigError(f"{where}: samples must be a positive integer, got {self.samples}")
        if self.weight is not None and not (self.weight > 0 and math.isfinite(self.weight)):
            raise ConfigError(f"{where}: weight must be a positive number, got {self.weight}")
        if self.samples is not None and self.weight is not None:
            raise ConfigError(f"{where}: give samples or weight, not both")
        if self.text_unit is not None and self.text_unit not in TEXT_UNITS:
            raise ConfigError(f"{where}: text_unit must be one of {', '.join(TEXT_UNITS)}, got {self.text_unit!r}")
        if self.filter is not None:
            compile_filter(self.filter)


_SPEC_TYPES = {f.name: f.type for f in dataclasses.fields(DataSpec)}
_SPEC_KEYS = [f.name for f in dataclasses.fields(DataSpec) if f.name != "path"]
_OPTIONS_START = re.compile(rf"(?:{'|'.join(_SPEC_KEYS)})\s*=")
_UNKNOWN_OPTION = re.compile(r":([A-Za-z_]\w*)\s*=")  # ":key=" after the path, with a key we do not know


def parse_data_spec(text: str) -> DataSpec:
    """`PATH[:key=value,key=value,...]` -> DataSpec.

    The options start at the first ':' that is followed by a known key and '=' (so `C:/x.jsonl`,
    `s3:/...` or `a:b.jsonl` stay paths); a string that names an existing file is always a bare path.
    Values are split on commas outside quotes and brackets; a value may be quoted '...' or "...".
    """
    text = text.strip()
    if not text:
        raise ConfigError("data spec is empty (expected PATH[:key=value,...])")
    if os.path.exists(text):
        return DataSpec(path=text)
    cut = next((i for i, ch in enumerate(text) if ch == ":" and _OPTIONS_START.match(text, i + 1)), None)
    if cut is None:
        typo = _UNKNOWN_OPTION.search(text)
        if typo:  # `my.jsonl:fromat=alpaca`: options with a misspelled key, not a file name
            close = difflib.get_close_matches(typo.group(1), _SPEC_KEYS, n=1, cutoff=0.6)
            raise ConfigError(f"data spec {text!r}: unknown key {typo.group(1)}"
                              + (f" (did you mean {close[0]}?)" if close else "")
                              + f"; the keys are {', '.join(_SPEC_KEYS)}")
        return DataSpec(path=text)
    path, options = text[:cut], text[cut + 1:]
    values: dict[str, Any] = {}
    for item in _split_top_level(options):
        key, sep, value = item.partition("=")
        key, value = key.strip(), unquote(value.strip())
        if not sep or key not in _SPEC_KEYS:
            close = difflib.get_close_matches(key, _SPEC_KEYS, n=1, cutoff=0.6) if sep else []
            raise ConfigError(f"data spec {text!r}: {item.strip()!r} is not key=value with a known key"
                              + (f" (did you mean {close[0]}?)" if close else "") + f" ({', '.join(_SPEC_KEYS)})")
        if key in values:
            raise ConfigError(f"data spec {text!r}: {key} given twice")
        if not value:
            raise ConfigError(f"data spec {text!r}: {key} has no value")
        values[key] = _spec_value(key, value, text)
    return DataSpec(path=path, **values)


def _spec_value(key: str, value: str, text: str) -> Any:
    tp = _SPEC_TYPES[key]
    try:
        if tp in ("int | None", "int"):
            return int(value)
        if tp == "float | None":
            return float(value)
    except ValueError:
        kind = "an integer" if "int" in tp else "a number"
        raise ConfigError(f"data spec {text!r}: {key} must be {kind}, got {value!r}") from None
    return value


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside quotes and brackets."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p.strip()]


def format_data_spec(spec: DataSpec) -> str:
    """The CLI form of a spec (parse_data_spec's inverse): path plus the options that differ from default."""
    items = []
    for f in dataclasses.fields(DataSpec):
        value = getattr(spec, f.name)
        if f.name == "path" or value == f.default:
            continue
        text = str(value)
        if re.search(r"[,'\"()\[\]{}]", text) or text != text.strip():
            text = f"'{text}'" if "'" not in text else f'"{text}"'
        items.append(f"{f.name}={text}")
    return spec.path + (":" + ",".join(items) if items else "")


def split_named(text: str) -> tuple[str, str] | None:
    """'NAME=VALUE' -> (NAME, VALUE); None when `text` has no '=' or nothing before it.

    NAME may be any text and VALUE may be empty: each caller says which it accepts (a benchmark name is
    letters, digits, '_', '.' and '-', and the text must not be an existing path; --task-file needs a
    path; a recipe's benchmark label holds no '/').
    """
    name, sep, value = text.partition("=")
    if not sep or not name:
        return None
    return name, value
