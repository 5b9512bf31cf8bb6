"""Which files (or Hugging Face Hub dataset) a `DataSpec` names, and the records of a whole source."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

from upstack.data.files import (
    ROW_SUFFIXES,
    TEXT_SUFFIXES,
    file_type,
    guess_text_unit,
    iter_file_records,
    iter_txt,
    special_file_error,
)
from upstack.data.spec import DataSpec
from upstack.errors import ConfigError, DataError
from upstack.hub import hub_offline

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}


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
    special = special_file_error(spec.path)
    if special is not None:
        raise special
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


def _is_connection_error(e: BaseException) -> bool:
    names = " ".join(t.__name__ for t in type(e).__mro__)
    return isinstance(e, ConnectionError) or any(w in names for w in ("Connection", "Timeout", "Offline"))


def load_hub_dataset(spec: DataSpec, *, streaming: bool):
    """`datasets.load_dataset` for a hub id (default split train); DataError when offline or failing."""
    try:
        import datasets

        return datasets.load_dataset(spec.path, name=spec.subset, split=spec.split or "train", streaming=streaming)
    except Exception as e:
        if _is_connection_error(e) or (hub_offline() and "offline" in str(e).lower()):
            why = "HF_HUB_OFFLINE=1 is set" if hub_offline() else f"{type(e).__name__}: {e}"
            raise DataError(
                f"{spec.path}: not a local file or folder, so it was read as a Hugging Face Hub dataset id, but"
                f" this machine is offline ({why}); download it first (e.g. `hf download --repo-type dataset"
                f" {spec.path} --local-dir DIR`) and pass the local folder or file") from None
        raise DataError(f"{spec.path}: could not load the hub dataset ({type(e).__name__}: {e})") from None


def iter_records(spec: DataSpec, files: list[Path] | None, *,
                  columns: list[str] | None = None) -> Iterator[tuple[str, int, Any, str | None]]:
    """(where, row number, value, problem) for every row of a source's files or hub dataset."""
    if files is None:
        label = f"{spec.path}[{spec.split or 'train'}]"
        for n, row in enumerate(load_hub_dataset(spec, streaming=True), 1):
            yield label, n, row, None
        return
    for path in files:
        for n, value, problem in iter_file_records(path, columns=columns):
            yield str(path), n, value, problem


def document_records(spec: DataSpec, files: list[Path] | None, hub_ds, field: str, only_field: bool):
    """(where, number, value, problem, unit) where unit is "row" for tabular records, else the txt unit.
    Parquet reads only the text column unless a filter may need the others."""
    if files is None:
        label = f"{spec.path}[{spec.split or 'train'}]"
        for n, row in enumerate(hub_ds, 1):
            yield label, n, row, None, "row"
        return
    for path in files:
        if file_type(path) == "txt":
            unit = spec.text_unit or guess_text_unit(path)
            for n, doc, problem in iter_txt(path, unit):
                yield str(path), n, doc, problem, unit
        else:
            columns = [field] if file_type(path) == "parquet" and only_field else None
            for n, value, problem in iter_file_records(path, columns=columns):
                yield str(path), n, value, problem, "row"
