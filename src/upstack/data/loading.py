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

from pathlib import Path
from typing import Iterator

from upstack.data.files import file_type
from upstack.data.filters import compile_filter
from upstack.data.formats import (
    FORMATS,
    KINDS,
    RowError,
    check_format,
    convert_row,
    detect_row_format,
    json_type,
)
from upstack.data.load_report import LoadReport, SourceReport
from upstack.data.mixing import chain, interleave, mix
from upstack.data.sources import (
    document_records,
    iter_records,
    load_hub_dataset,
    resolve_files,
)
from upstack.data.spec import DataSpec, format_data_spec, parse_data_spec
from upstack.errors import ConfigError, DataError

# Re-exported: the names callers import from here.
__all__ = ["DataSpec", "parse_data_spec", "format_data_spec", "compile_filter", "LoadReport", "SourceReport",
           "file_type", "resolve_files", "load_hub_dataset", "load_sft_rows", "load_dpo_rows", "iter_text_documents"]


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
    rows = mix(specs, per_source, report, seed)
    return rows, report


def _read_source(spec: DataSpec, files: list[Path] | None, kind: str, src: SourceReport,
                 skip_bad_rows: bool) -> list[dict]:
    from tqdm.auto import tqdm  # honours TQDM_DISABLE (the CLI's --quiet)

    keep = compile_filter(spec.filter) if spec.filter else None
    rows = []
    records = tqdm(iter_records(spec, files), desc=f"reading {spec.path}", unit=" rows", leave=False,
                   mininterval=1.0, disable=None)
    for where, n, value, problem in records:
        src.read += 1
        try:
            if problem:
                raise DataError(problem)
            if src.format is None and isinstance(value, dict):
                src.format = detect_row_format(value, kind, spec.path)  # a whole-source error: never skipped
            if keep is not None and isinstance(value, dict) and not keep(value, n):
                src.filtered += 1
                continue
            rows.append(convert_row(value, src.format or "?"))
        except DataError as e:
            if src.format is None and isinstance(value, dict):
                raise  # could not detect the format
            message = f"{where} row {n}: {e}"
            if not skip_bad_rows:
                raise DataError(message + SKIP_HINT) from None
            src.skip(str(e), message)
    src.kept = len(rows)
    if not rows:
        raise DataError(f"{src.spec}: no usable rows ({src.counts()})" + _first_skip(src))
    return rows


SKIP_HINT = " (--skip-bad-rows skips malformed rows like this one and counts them by reason)"


def _first_skip(src: SourceReport) -> str:
    return f"; first skipped: {src.skip_examples[0]}" if src.skip_examples else ""


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
        return interleave(streams, [s.weight for s in specs], seed, report)
    return chain(streams, report)


def _source_documents(spec: DataSpec, files: list[Path] | None, hub_ds, src: SourceReport,
                      skip_bad_rows: bool) -> Iterator[str]:
    keep = compile_filter(spec.filter) if spec.filter else None
    field = spec.field or "text"
    count = 0
    for where, n, value, problem, unit in document_records(spec, files, hub_ds, field, keep is None):
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
