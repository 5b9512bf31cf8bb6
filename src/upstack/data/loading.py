"""Read training data: files, folders or hub ids -> normalised SFT/DPO rows, or a stream of documents.

A `DataSpec` names one source and how to take rows from it (format, split, samples, weight, seed,
filter). `parse_data_spec` reads the CLI form `PATH[:key=value,...]`; recipe YAML fills the same
dataclass through `config_from_dict`. `load_sft_rows` / `load_dpo_rows` read every source in full
(instruction and preference sets fit in memory), convert rows with the adapters of formats.py, sample
and mix them; `iter_text_documents` streams pretraining documents without holding a corpus in memory.
Every loader fills a `LoadReport` (per source: rows read, filtered, skipped and why, used).
See docs/data.md for the user-facing description.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import io
import json
import math
import os
import random
import re
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterator

from upstack.data.formats import KINDS, FORMATS, RowError, check_format, convert_row, detect_format, json_type
from upstack.errors import ConfigError, DataError

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
        return DataSpec(path=text)
    path, options = text[:cut], text[cut + 1:]
    values: dict[str, Any] = {}
    for item in _split_top_level(options):
        key, sep, value = item.partition("=")
        key, value = key.strip(), _unquote(value.strip())
        if not sep or key not in _SPEC_KEYS:
            raise ConfigError(f"data spec {text!r}: {item.strip()!r} is not key=value with a known key"
                              f" ({', '.join(_SPEC_KEYS)})")
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


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"" and value[0] not in value[1:-1]:
        return value[1:-1]
    return value


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


# ---------------------------------------------------------------------------------------------
# Filters: a tiny expression language, parsed with `ast` and walked by hand (nothing is eval'd).

FILTER_HELP = ("filters are 'FIELD=VALUE' or an expression of fields, constants ('text', 42, True, None),"
               " len(FIELD), lower(FIELD), _row (the row number), comparisons (== != < <= > >= in, not in),"
               " and, or, not, and tuples/lists of constants")
_FIELD_EQUALS = re.compile(r"\s*([A-Za-z_]\w*)\s*=(?!=)\s*(.*?)\s*", re.S)
_FUNCS: dict[str, Callable[[Any], Any]] = {"len": len, "lower": str.lower}
_OPS = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
        ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
        ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
_OP_TEXT = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
            ast.In: "in", ast.NotIn: "not in"}


def compile_filter(text: str) -> Callable[[dict, int], bool]:
    """A filter expression -> predicate(row, row_number). ConfigError for anything outside the grammar."""
    if len(text) > 2000:
        raise ConfigError("filter: longer than 2000 characters")
    m = _FIELD_EQUALS.fullmatch(text)
    if m:
        name, wanted = m.group(1), _unquote(m.group(2))

        def equals(row: dict, n: int) -> bool:
            return _as_text(_lookup(name, row, n, text)) == wanted
        return equals
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"filter {text!r}: not a valid expression ({e.msg}); {FILTER_HELP}") from None
    _check_node(tree, text)

    def predicate(row: dict, n: int) -> bool:
        return bool(_eval(tree, row, n, text))
    return predicate


def _check_node(node: ast.AST, text: str) -> None:
    ok = False
    if isinstance(node, ast.BoolOp) or (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not)):
        ok = True
    elif isinstance(node, ast.Compare):
        ok = all(type(op) in _OPS for op in node.ops)
    elif isinstance(node, ast.Name):
        ok = True
    elif isinstance(node, ast.Constant):
        ok = node.value is None or isinstance(node.value, (str, int, float, bool))
    elif isinstance(node, (ast.Tuple, ast.List)):
        ok = all(isinstance(e, ast.Constant) for e in node.elts)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        ok = isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
    elif isinstance(node, ast.Call):
        ok = (isinstance(node.func, ast.Name) and node.func.id in _FUNCS and len(node.args) == 1
              and not node.keywords and not isinstance(node.args[0], ast.Starred))
        if ok:
            _check_node(node.args[0], text)
            return
    if not ok:
        raise ConfigError(f"filter {text!r}: {ast.unparse(node)!r} is not allowed; {FILTER_HELP}")
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.expr_context, ast.boolop, ast.cmpop, ast.unaryop)):
            _check_node(child, text)


def _lookup(name: str, row: dict, n: int, text: str) -> Any:
    if name == "_row":
        return n
    if name not in row:
        raise DataError(f"filter {text!r}: field '{name}' is missing")
    return row[name]


def _eval(node: ast.AST, row: dict, n: int, text: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _lookup(node.id, row, n, text)
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(e.value for e in node.elts)
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, row, n, text)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, row, n, text) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Call):
        arg = _eval(node.args[0], row, n, text)
        name = node.func.id
        if (name == "len" and not isinstance(arg, (str, list, dict))) or (name == "lower" and not isinstance(arg, str)):
            raise DataError(f"filter {text!r}: {name}() cannot take a {json_type(arg)}")
        return _FUNCS[name](arg)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, row, n, text)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, row, n, text)
            try:
                if not _OPS[type(op)](left, right):
                    return False
            except TypeError:
                raise DataError(f"filter {text!r}: cannot apply '{_OP_TEXT[type(op)]}' to a"
                                f" {json_type(left)} and a {json_type(right)}") from None
            left = right
        return True
    raise AssertionError(f"unchecked filter node {ast.dump(node)}")  # _check_node rejects these


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Reports

@dataclass
class SourceReport:
    """What happened to one source's rows."""

    spec: str
    format: str | None = None
    read: int = 0                                      # rows (documents) read from the source
    filtered: int = 0                                  # dropped by the filter (text: also empty documents)
    skipped: int = 0                                   # malformed rows dropped (skip_bad_rows)
    skip_reasons: dict[str, int] = dc_field(default_factory=dict)
    skip_examples: list[str] = dc_field(default_factory=list)   # the first few, with file and row
    kept: int = 0                                      # rows that passed (before sampling/mixing)
    used: int = 0                                      # rows in the output

    def skip(self, reason: str, example: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
        if len(self.skip_examples) < 5:
            self.skip_examples.append(example)

    def counts(self) -> str:
        return (f"read {self.read}, filtered {self.filtered}, skipped {self.skipped},"
                f" kept {self.kept}, used {self.used}")


@dataclass
class LoadReport:
    """Per-source counts of a load; `str()` for people, `to_dict()` for --json."""

    kind: str                                          # "sft", "dpo" or "text"
    seed: int = 0
    sources: list[SourceReport] = dc_field(default_factory=list)

    @property
    def used(self) -> int:
        return sum(s.used for s in self.sources)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "used": self.used,
                "sources": [dataclasses.asdict(s) for s in self.sources]}

    def __str__(self) -> str:
        unit = "documents" if self.kind == "text" else "rows"
        lines = [f"{self.kind} data: {self.used} {unit} from {len(self.sources)} source(s)"]
        for s in self.sources:
            lines.append(f"  {s.spec} [{s.format or '?'}]: {s.counts()}")
            for reason, count in s.skip_reasons.items():
                lines.append(f"    skipped {count} x {reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Sources: which files (or hub dataset) a spec names, and their records

ROW_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                ".csv": "csv", ".tsv": "tsv"}
TEXT_SUFFIXES = {".txt": "txt", ".text": "txt", ".raw": "txt"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
_PEEK_LINES = 1000
_CHUNK = 1 << 20


def file_type(path: Path) -> str | None:
    """jsonl, json, parquet, csv, tsv or txt from the name (a trailing .gz is allowed, not for parquet)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
        if suffixes and suffixes[-1] == ".parquet":
            return None
    if not suffixes:
        return None
    return ROW_SUFFIXES.get(suffixes[-1]) or TEXT_SUFFIXES.get(suffixes[-1])


def resolve_files(spec: DataSpec, *, text: bool) -> list[Path] | None:
    """The files a local spec reads, in order; None for a hub id. DataError/ConfigError if none."""
    path = Path(spec.path)
    allowed = {**ROW_SUFFIXES, **TEXT_SUFFIXES} if text else ROW_SUFFIXES
    if path.is_file():
        if spec.split is not None:
            raise ConfigError(f"{spec.path}: split= applies to folders and hub datasets, not to a file")
        kind = file_type(path)
        if kind is None:
            raise DataError(f"{spec.path}: unknown file type (known: {', '.join(sorted(allowed))}, optionally .gz)")
        if kind == "txt" and not text:
            raise DataError(f"{spec.path}: a plain-text file holds documents, not rows; SFT and DPO data must be"
                            f" JSONL, JSON, parquet, CSV or TSV")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_data_file(p, path, allowed))
        if not files:
            raise DataError(f"{spec.path}: folder has no data files ({', '.join(sorted(allowed))})")
        return _split_files(files, path, spec)
    if _HUB_ID.fullmatch(spec.path) is None or file_type(path) is not None:
        raise DataError(f"{spec.path}: no such file or folder (hub datasets are named owner/name)")
    return None  # a hub dataset id


def _is_data_file(p: Path, root: Path, allowed: dict) -> bool:
    rel = p.relative_to(root)
    if any(part.startswith(".") for part in rel.parts):
        return False
    if re.match(r"(readme|license|licence)\b", p.name, re.I):
        return False
    kind = file_type(p)
    return kind is not None and kind in allowed.values()


def _split_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(^|[-_./]){re.escape(name.lower())}([-_./]|$)")


def _split_files(files: list[Path], root: Path, spec: DataSpec) -> list[Path]:
    rel = {f: f.relative_to(root).as_posix().lower() for f in files}

    def named(split: str) -> list[Path]:
        pats = [_split_pattern(n) for n in _SPLIT_NAMES.get(split, (split,))]
        return [f for f in files if any(p.search(rel[f]) for p in pats)]

    if spec.split is not None:
        chosen = named(spec.split)
        if not chosen:
            raise DataError(f"{spec.path}: no files for split {spec.split!r} (files: "
                            f"{', '.join(rel[f] for f in files[:10])})")
        return chosen
    if any(named(s) for s in _SPLIT_NAMES):
        if named("train"):
            return named("train")
        raise DataError(f"{spec.path}: files are named by split but none is 'train'; pass split=NAME")
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


# A record is (row number, value, problem): problem is None or why the row could not be read.
Record = tuple[int, Any, "str | None"]


def _iter_file_records(path: Path, *, columns: list[str] | None = None) -> Iterator[Record]:
    kind = file_type(path)
    if kind == "jsonl":
        yield from _iter_jsonl(path)
    elif kind == "json":
        yield from _iter_json(path)
    elif kind == "parquet":
        yield from _iter_parquet(path, columns)
    elif kind in ("csv", "tsv"):
        with _open_text(path) as fh:
            reader = csv.DictReader(fh, delimiter="\t" if kind == "tsv" else ",")
            if reader.fieldnames is None:
                return
            for n, row in enumerate(reader, 1):
                if None in row:
                    yield n, row, f"has more values than the header has columns ({len(reader.fieldnames)})"
                else:
                    yield n, row, None
    else:
        raise AssertionError(kind)


def _iter_jsonl(path: Path) -> Iterator[Record]:
    """Rows numbered by line (blank lines are skipped but counted)."""
    with _open_binary(path) as fh:
        for n, line in enumerate(fh, 1):
            if n == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except UnicodeDecodeError:
                yield n, None, "is not valid UTF-8"
                continue
            except ValueError as e:
                yield n, None, f"is not valid JSON ({getattr(e, 'msg', e)})"
                continue
            yield n, value, None


def _iter_json(path: Path) -> Iterator[Record]:
    """A JSON array of rows, parsed incrementally (rows numbered from 1); a .json file holding JSON
    Lines is read as JSONL."""
    with _open_text(path) as fh:
        reader = _Chunks(fh)
        first = reader.peek()
        if first == "{":
            fh.close()
            yield from _iter_jsonl(path)
            return
        if first != "[":
            raise DataError(f"{path}: expected a JSON array of rows (or JSON Lines)")
        reader.pos += 1
        decoder = json.JSONDecoder()
        n = 0
        while True:
            ch = reader.peek()
            if ch == "]":
                return
            if n and ch == ",":
                reader.pos += 1
                ch = reader.peek()
            elif n:
                raise DataError(f"{path} row {n + 1}: expected ',' or ']' after row {n}")
            if not ch:
                raise DataError(f"{path}: the JSON array is not closed (after row {n})")
            while True:
                try:
                    value, end = decoder.raw_decode(reader.buf, reader.pos)
                    if end < len(reader.buf) or reader.eof:  # a number cut at the chunk end parses short
                        break
                except json.JSONDecodeError as e:
                    if reader.eof:
                        raise DataError(f"{path} row {n + 1}: not valid JSON ({e.msg}); a broken JSON array"
                                        f" cannot be read past it") from None
                reader.fill()
            n += 1
            yield n, value, None
            reader.advance(end)


class _Chunks:
    """A text stream read in chunks: `buf[pos:]` is unread; fill() grows the buffer geometrically."""

    def __init__(self, fh):
        self.fh, self.buf, self.pos, self.eof = fh, "", 0, False

    def fill(self) -> None:
        more = self.fh.read(max(_CHUNK, len(self.buf) - self.pos))
        self.eof = not more
        self.buf, self.pos = self.buf[self.pos:] + more, 0

    def peek(self) -> str:
        """The next non-whitespace character ("" at the end)."""
        while True:
            self.pos = _skip_ws(self.buf, self.pos)
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos] if self.pos < len(self.buf) else ""
            self.fill()

    def advance(self, pos: int) -> None:
        self.pos = pos
        if pos > _CHUNK:
            self.buf, self.pos = self.buf[pos:], 0


def _skip_ws(buf: str, pos: int) -> int:
    while pos < len(buf) and buf[pos] in " \t\r\n":
        pos += 1
    return pos


def _iter_parquet(path: Path, columns: list[str] | None) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a bad file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    if columns:
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (columns: {', '.join(pf.schema_arrow.names)});"
                            f" pass field=NAME")
    n = 0
    for batch in pf.iter_batches(batch_size=1024, columns=columns):
        for row in batch.to_pylist():
            n += 1
            yield n, row, None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _is_connection_error(e: BaseException) -> bool:
    names = " ".join(t.__name__ for t in type(e).__mro__)
    return isinstance(e, ConnectionError) or any(w in names for w in ("Connection", "Timeout", "Offline"))


def load_hub_dataset(spec: DataSpec, *, streaming: bool):
    """`datasets.load_dataset` for a hub id (default split train); DataError when offline or failing."""
    try:
        import datasets

        return datasets.load_dataset(spec.path, name=spec.subset, split=spec.split or "train", streaming=streaming)
    except Exception as e:
        if _is_connection_error(e) or (_offline() and "offline" in str(e).lower()):
            why = "HF_HUB_OFFLINE=1 is set" if _offline() else f"{type(e).__name__}: {e}"
            raise DataError(
                f"{spec.path}: not a local file or folder, so it was read as a Hugging Face Hub dataset id, but"
                f" this machine is offline ({why}); download it first (e.g. `hf download --repo-type dataset"
                f" {spec.path} --local-dir DIR`) and pass the local folder or file") from None
        raise DataError(f"{spec.path}: could not load the hub dataset ({type(e).__name__}: {e})") from None


def _iter_records(spec: DataSpec, files: list[Path] | None, *,
                  columns: list[str] | None = None) -> Iterator[tuple[str, int, Any, str | None]]:
    """(where, row number, value, problem) for every row of a source's files or hub dataset."""
    if files is None:
        label = f"{spec.path}[{spec.split or 'train'}]"
        for n, row in enumerate(load_hub_dataset(spec, streaming=True), 1):
            yield label, n, row, None
        return
    for path in files:
        for n, value, problem in _iter_file_records(path, columns=columns):
            yield str(path), n, value, problem


# ---------------------------------------------------------------------------------------------
# SFT / DPO rows

def load_sft_rows(specs: list[DataSpec], *, skip_bad_rows: bool = False,
                  seed: int = 0) -> tuple[list[dict], LoadReport]:
    """Read, filter, convert, sample and mix SFT sources -> ([{"messages": [...]}, ...], report)."""
    return _load_rows(specs, "sft", skip_bad_rows=skip_bad_rows, seed=seed)


def load_dpo_rows(specs: list[DataSpec], *, skip_bad_rows: bool = False,
                  seed: int = 0) -> tuple[list[dict], LoadReport]:
    """Read, filter, convert, sample and mix DPO sources -> ([{"prompt", "chosen", "rejected"}, ...], report)."""
    return _load_rows(specs, "dpo", skip_bad_rows=skip_bad_rows, seed=seed)


def _check_specs(specs: list[DataSpec], kind: str) -> list[DataSpec]:
    specs = [parse_data_spec(s) if isinstance(s, str) else s for s in specs]
    if not specs:
        raise ConfigError(f"no {KINDS.get(kind, kind)} data given")
    for spec in specs:
        if not isinstance(spec, DataSpec):
            raise ConfigError(f"data source must be a DataSpec or a spec string, got {type(spec).__name__}")
        if kind != "text":
            if spec.format == "text":
                raise ConfigError(f"{spec.path}: format 'text' is for pretraining data, not {KINDS[kind]}")
            if spec.format is not None:
                check_format(spec.format, kind, format_data_spec(spec))
            for name in ("field", "text_unit"):
                if getattr(spec, name) is not None:
                    raise ConfigError(f"{spec.path}: {name}= applies to pretraining text only")
        elif spec.format not in (None, "text"):
            raise ConfigError(f"{spec.path}: format {spec.format!r} is for {KINDS[FORMATS[spec.format].kind]} data;"
                              f" pretraining reads text (leave format out or use format=text)")
    return specs


def _load_rows(specs: list[DataSpec], kind: str, *, skip_bad_rows: bool, seed: int) -> tuple[list[dict], LoadReport]:
    specs = _check_specs(specs, kind)
    sources = [resolve_files(spec, text=False) for spec in specs]  # every path checked before any reading
    report = LoadReport(kind=kind, seed=seed)
    per_source = []
    for spec, files in zip(specs, sources):
        src = SourceReport(spec=format_data_spec(spec), format=spec.format)
        report.sources.append(src)
        per_source.append(_read_source(spec, files, kind, src, skip_bad_rows))
    rows = _mix(specs, per_source, report, seed)
    return rows, report


def _read_source(spec: DataSpec, files: list[Path] | None, kind: str, src: SourceReport,
                 skip_bad_rows: bool) -> list[dict]:
    from tqdm.auto import tqdm  # honours TQDM_DISABLE (the CLI's --quiet)

    keep = compile_filter(spec.filter) if spec.filter else None
    rows = []
    records = tqdm(_iter_records(spec, files), desc=f"reading {spec.path}", unit=" rows", leave=False,
                   mininterval=1.0, disable=None)
    for where, n, value, problem in records:
        src.read += 1
        try:
            if problem:
                raise DataError(problem)
            if src.format is None and isinstance(value, dict):
                src.format = detect_format(value, kind, spec.path)  # a whole-source error: never skipped
            if keep is not None and isinstance(value, dict) and not keep(value, n):
                src.filtered += 1
                continue
            rows.append(convert_row(value, src.format or "?"))
        except DataError as e:
            if src.format is None and isinstance(value, dict):
                raise  # could not detect the format
            message = f"{where} row {n}: {e}"
            if not skip_bad_rows:
                raise DataError(message) from None
            src.skip(str(e), message)
    src.kept = len(rows)
    if not rows:
        raise DataError(f"{src.spec}: no usable rows ({src.counts()})" + _first_skip(src))
    return rows


def _first_skip(src: SourceReport) -> str:
    return f"; first skipped: {src.skip_examples[0]}" if src.skip_examples else ""


def _mix(specs: list[DataSpec], per_source: list[list[dict]], report: LoadReport, seed: int) -> list[dict]:
    """Per source: `samples` -> exactly that many (seeded sample); `weight` -> a share of the weighted
    total, which is as large as the sources allow without repeating a row; neither -> every row in
    file order. Several sources: the mixture is shuffled with `seed`."""
    weights = {i: s.weight for i, s in enumerate(specs) if s.weight is not None}
    total_w = sum(weights.values())
    weighted_total = min((len(per_source[i]) * total_w / w for i, w in weights.items()), default=0.0)
    out = []
    for i, (spec, rows) in enumerate(zip(specs, per_source)):
        src = report.sources[i]
        if spec.samples is not None:
            if spec.samples > len(rows):
                raise DataError(f"{src.spec}: samples={spec.samples} but only {len(rows)} rows are usable"
                                f" ({src.counts()})")
            take = random.Random(spec.seed).sample(rows, spec.samples)
        elif spec.weight is not None:
            count = min(len(rows), round(weighted_total * spec.weight / total_w))
            if count == 0:
                raise DataError(f"{src.spec}: weight {spec.weight} gives this source 0 of the mixture's rows")
            take = random.Random(spec.seed).sample(rows, count)
        else:
            take = rows
        src.used = len(take)
        out.extend(take)
    if len(specs) > 1:
        random.Random(seed).shuffle(out)
    return out


# ---------------------------------------------------------------------------------------------
# Pretraining text

def iter_text_documents(specs: list[DataSpec], *, seed: int = 0, skip_bad_rows: bool = False,
                        report: LoadReport | None = None) -> Iterator[str]:
    """Stream documents (str) from text sources, never holding a corpus in memory.

    .txt/.raw/.text files: one document per blank-line-separated paragraph, or per line when the
    file's first 1000 lines have no blank line (text_unit= overrides: paragraph | line | file);
    documents are stripped of surrounding whitespace. JSONL/JSON/CSV/parquet/hub rows: the `field`
    column (default "text"). Empty documents are dropped (counted as filtered). `samples` takes the
    first N documents after the filter. With weights (all sources or none), sources take turns in the
    ratio of their weights (a seeded, evenly spread schedule) and the stream ends when any source runs
    out; without weights sources follow one another. Paths, formats and options are
    checked when this is called; rows are read as the stream is consumed. Pass a LoadReport to have it
    filled (kind "text") as documents are read.
    """
    specs = _check_specs(specs, "text")
    weighted = [s.weight is not None for s in specs]
    if any(weighted) and not all(weighted):
        raise ConfigError("text sources: give weight= to every source or to none")
    sources = [resolve_files(spec, text=True) for spec in specs]
    hub = {i: load_hub_dataset(s, streaming=True) for i, (s, f) in enumerate(zip(specs, sources)) if f is None}
    if report is None:
        report = LoadReport(kind="text", seed=seed)
    report.kind, report.seed = "text", seed
    streams = []
    for i, (spec, files) in enumerate(zip(specs, sources)):
        src = SourceReport(spec=format_data_spec(spec), format="text")
        report.sources.append(src)
        streams.append(_source_documents(spec, files, hub.get(i), src, skip_bad_rows))
    if all(weighted):
        return _interleave(streams, [s.weight for s in specs], seed, report)
    return _chain(streams, report)


def _chain(streams: list[Iterator[str]], report: LoadReport) -> Iterator[str]:
    for stream, src in zip(streams, report.sources):
        for doc in stream:
            src.used += 1
            yield doc


def _interleave(streams: list[Iterator[str]], weights: list[float], seed: int, report: LoadReport) -> Iterator[str]:
    """Stride scheduling: each source is due every 1/weight steps, from a seeded random phase, so any
    prefix of the stream holds the sources in their weight ratio (within one document each)."""
    rng = random.Random(seed)
    due = [rng.random() / w for w in weights]
    while True:
        i = min(range(len(streams)), key=due.__getitem__)
        doc = next(streams[i], None)
        if doc is None:  # first exhausted: keeps the proportions exact
            for stream in streams:
                stream.close()
            return
        due[i] += 1 / weights[i]
        report.sources[i].used += 1
        yield doc


def _source_documents(spec: DataSpec, files: list[Path] | None, hub_ds, src: SourceReport,
                      skip_bad_rows: bool) -> Iterator[str]:
    keep = compile_filter(spec.filter) if spec.filter else None
    field = spec.field or "text"
    count = 0
    for where, n, value, problem, unit in _document_records(spec, files, hub_ds, field, keep is None):
        src.read += 1
        try:
            if problem:
                raise DataError(problem)
            if unit != "row":
                row = {"text": value}
                doc = value
            else:
                if not isinstance(value, dict):
                    raise DataError(f"must be an object with a '{field}' field, got {json_type(value)}")
                row = value
                if field not in value:
                    raise RowError(field, "is missing (pass field=NAME for the column that holds the text)")
                doc = value[field]
                if not isinstance(doc, str):
                    raise RowError(field, f"must be a string, got {json_type(doc)}")
            if not doc.strip() or (keep is not None and not keep(row, n)):
                src.filtered += 1
                continue
        except DataError as e:
            message = f"{where} {'row' if unit == 'row' else 'line'} {n}: {e}"
            if not skip_bad_rows:
                raise DataError(message) from None
            src.skip(str(e), message)
            continue
        count += 1
        src.kept += 1
        yield doc
        if spec.samples is not None and count >= spec.samples:
            return
    if count == 0:
        raise DataError(f"{src.spec}: no usable documents ({src.counts()})" + _first_skip(src))


def _document_records(spec: DataSpec, files: list[Path] | None, hub_ds, field: str, only_field: bool):
    """(where, number, value, problem, unit) where unit is "row" for tabular records, else the txt unit.
    Parquet reads only the text column unless a filter may need the others."""
    if files is None:
        label = f"{spec.path}[{spec.split or 'train'}]"
        for n, row in enumerate(hub_ds, 1):
            yield label, n, row, None, "row"
        return
    for path in files:
        if file_type(path) == "txt":
            unit = spec.text_unit or _guess_text_unit(path)
            for n, doc, problem in _iter_txt(path, unit):
                yield str(path), n, doc, problem, unit
        else:
            columns = [field] if file_type(path) == "parquet" and only_field else None
            for n, value, problem in _iter_file_records(path, columns=columns):
                yield str(path), n, value, problem, "row"


def _guess_text_unit(path: Path) -> str:
    """paragraph if a blank line occurs among the first lines (up to 1000 lines or 1 MiB), else line."""
    seen = 0
    with _open_binary(path) as fh:
        for i, line in enumerate(fh):
            if i >= _PEEK_LINES or seen > _CHUNK:
                break
            seen += len(line)
            if not line.strip():
                return "paragraph"
    return "line"


def _iter_txt(path: Path, unit: str) -> Iterator[tuple[int, str, str | None]]:
    """(first line number, document, problem) per paragraph / line / file."""
    with _open_binary(path) as fh:
        if unit == "file":
            data = fh.read()
            try:
                yield 1, data.decode("utf-8-sig").replace("\r\n", "\n").strip(), None
            except UnicodeDecodeError as e:
                yield 1, "", f"is not valid UTF-8 (byte {e.start})"
            return
        para: list[str] = []
        start = 0
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield n, "", "is not valid UTF-8"
                continue
            if unit == "line":
                yield n, line.strip(), None
            elif line.strip():
                if not para:
                    start = n
                para.append(line)
            elif para:
                yield start, "\n".join(para).strip(), None
                para = []
        if para:
            yield start, "\n".join(para).strip(), None
