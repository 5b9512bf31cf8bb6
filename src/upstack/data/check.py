"""`upstack data SPEC...`: what a training stage would take from data specs, without training.

The rows are read by the training loaders themselves (`load_sft_rows`, `load_dpo_rows`,
`iter_text_documents`) with bad rows skipped and counted, so the counts, the detected format and every
reason for dropping a row are exactly those of a training run; a first pass over the raw records counts
the fields the rows carry and, without `kind`, tells SFT, DPO and pretraining data apart.
"""

from __future__ import annotations

from upstack.data.files import file_type
from upstack.data.formats import FORMATS, KINDS, detect_row_format
from upstack.data.load_report import LoadReport
from upstack.data.loading import iter_text_documents, load_dpo_rows, load_sft_rows
from upstack.data.sources import iter_records, resolve_files
from upstack.data.spec import DataSpec, format_data_spec, parse_data_spec
from upstack.errors import ConfigError, DataError

STAGE_KINDS = {"sft": "sft", "dpo": "dpo", "pretrain": "text"}   # --for STAGE -> the loaders' kind
KIND_STAGES = {v: k for k, v in STAGE_KINDS.items()}


def _raw_fields(spec: DataSpec) -> dict:
    """One pass over a source's raw records: how many rows carry each field (in first-seen order), how many
    are objects, and the first object row. Plain-text files hold documents, not fields."""
    files = resolve_files(spec, text=True)
    txt = [f for f in files or [] if file_type(f) == "txt"]
    rows = [f for f in files or [] if file_type(f) != "txt"] if files is not None else None
    fields: dict[str, int] = {}
    objects, first = 0, None
    if rows is None or rows:
        for _where, _n, value, problem in iter_records(spec, rows):
            if problem or not isinstance(value, dict):
                continue
            objects += 1
            first = value if first is None else first
            for key in value:
                fields[key] = fields.get(key, 0) + 1
    return {"fields": fields, "objects": objects, "first": first, "text_files": len(txt)}


def _detect_kind(spec: DataSpec, raw: dict) -> str:
    """sft, dpo or text for one source: from format=, field=/text_unit=, plain-text files, else the first
    row's keys (a row that is both a DPO pair and an SFT conversation, as UltraFeedback's, is DPO data)."""
    where = format_data_spec(spec)
    if spec.format == "text" or spec.field or spec.text_unit or raw["text_files"]:
        return "text"
    if spec.format is not None:
        return FORMATS[spec.format].kind
    row = raw["first"]
    if row is None:
        raise DataError(f"{where}: no row is a JSON object, so there is nothing to detect a format from")
    for kind in ("dpo", "sft"):
        try:
            detect_row_format(row, kind, where)
            return kind
        except DataError:
            continue
    if "text" in row:
        return "text"
    raise DataError(f"{where}: the first row's keys ({', '.join(map(str, row))}) are no SFT or DPO format and "
                    f"have no 'text' field; pass --for sft|dpo|pretrain and format=NAME (docs/data.md: Formats)")


def check_data(specs: list[str | DataSpec], *, kind: str | None = None, seed: int = 0) -> dict:
    """Read `specs` as a training stage would (`kind`: sft, dpo or text; None: detect) and say what it would
    take: per source its format, fields, rows read, what is dropped and why, what is used; and one example
    row. Whole-source problems (a missing file, an unknown format, no usable rows, too few rows for
    samples=) raise, as they would stop training."""
    specs = [parse_data_spec(s) if isinstance(s, str) else s for s in specs]
    if not specs:
        raise ConfigError("no data spec given")
    raws = [_raw_fields(s) for s in specs]
    if kind is None:
        kinds = {format_data_spec(s): _detect_kind(s, r) for s, r in zip(specs, raws)}
        if len(set(kinds.values())) > 1:
            seen = ", ".join(f"{k} ({KIND_STAGES[v]})" for k, v in kinds.items())
            raise ConfigError(f"the sources are for different stages: {seen}; check them one at a time, or "
                              f"pass --for sft|dpo|pretrain")
        kind = next(iter(kinds.values()))
    if kind == "text":
        report = LoadReport(kind="text", seed=seed)
        first = None
        for doc in iter_text_documents(specs, seed=seed, skip_bad_rows=True, report=report):
            first = doc if first is None else first
        example = first
    else:
        load = load_sft_rows if kind == "sft" else load_dpo_rows
        rows, report = load(specs, skip_bad_rows=True, seed=seed)
        example = rows[0] if rows else None
    sources = []
    for spec, raw, src in zip(specs, raws, report.sources):
        sources.append({
            "spec": src.spec, "format": src.format, "format_detected": spec.format is None and kind != "text",
            "read": src.read, "objects": raw["objects"], "fields": raw["fields"],
            "filtered": src.filtered, "filter": spec.filter,
            "skipped": src.skipped, "skip_reasons": src.skip_reasons, "skip_examples": src.skip_examples,
            "kept": src.kept, "used": src.used, "not_sampled": src.kept - src.used,
            "sampling": ("samples" if spec.samples is not None else "weight" if spec.weight is not None
                         else "interleave" if kind == "text" and src.kept > src.used else None),
        })
    return {"stage": KIND_STAGES[kind], "kind": kind, "seed": seed, "used": report.used, "sources": sources,
            "example": example}


def _fields_line(fields: dict[str, int], objects: int) -> str:
    every = [k for k, n in fields.items() if n == objects]
    some = [f"{k} ({n} rows)" for k, n in fields.items() if n != objects]
    return ", ".join(([", ".join(every) + " (every row)"] if every else []) + some) or "-"


def _short(text: str, width: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def format_check(result: dict) -> str:
    """The human-readable form of `check_data`'s result."""
    unit = "documents" if result["kind"] == "text" else "rows"
    what = KINDS.get(result["kind"], "pretraining")
    lines = [f"{what} data for `upstack {result['stage']}`: {result['used']} {unit} would be used from "
             f"{len(result['sources'])} source(s) (seed {result['seed']})"]
    for s in result["sources"]:
        how = "detected from the first row's keys" if s["format_detected"] else "given"
        lines += ["", s["spec"], f"  format:   {s['format'] or '?'}" + ("" if result["kind"] == "text" else f" ({how})")]
        if s["objects"]:
            lines.append(f"  fields:   {_fields_line(s['fields'], s['objects'])}")
        lines.append(f"  {unit + ':':9} {s['read']} read, {s['kept']} kept, {s['used']} used")
        dropped = s["filtered"] + s["skipped"] + s["not_sampled"]
        lines.append(f"  dropped:  {dropped}" + ("" if dropped else " (none)"))
        if s["filtered"]:
            why = f"dropped by the filter {s['filter']!r}" if s["filter"] else ""
            if result["kind"] == "text":  # the text loader counts empty documents as filtered
                why = f"empty, or {why}" if why else "empty documents"
            lines.append(f"    {s['filtered']} x {why}")
        for reason, count in s["skip_reasons"].items():
            lines.append(f"    {count} x {reason}")
        if s["not_sampled"]:
            lines.append(f"    {s['not_sampled']} not taken by {s['sampling'] or 'sampling'}"
                         + (" (the stream ends when a weighted source runs out)" if s["sampling"] == "interleave"
                            else ""))
        if s["skip_examples"]:
            lines.append(f"  without --skip-bad-rows, training stops at {s['skip_examples'][0]}")
    example = result["example"]
    if example is not None:
        lines += ["", f"first {unit[:-1]} used, as the stage reads it:"]
        lines += [f"  {_short(text)}" for text in ([example] if isinstance(example, str) else _render(example))]
    return "\n".join(lines)


def _render(row: dict) -> list[str]:
    """A normalised SFT or DPO row as `role: content` lines (DPO: the prompt's, then chosen and rejected)."""
    if "messages" in row:
        return [f"{m['role']}: {m['content']}" for m in row["messages"]]
    return ([f"{m['role']}: {m['content']}" for m in row["prompt"]]
            + [f"{side} {m['role']}: {m['content']}" for side in ("chosen", "rejected") for m in row[side]])


def data_stage_kind(stage: str | None) -> str | None:
    """--for STAGE -> the loaders' kind (None: detect)."""
    return STAGE_KINDS[stage] if stage else None

