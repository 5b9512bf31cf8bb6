"""The one reader of JSON rows: JSON Lines (one object per line, blank lines skipped but counted) and
JSON array files. Callers word their own errors from what it yields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from upstack.errors import DataError


def json_lines(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any, ValueError | None]]:
    """(line number, value, None) for each non-blank line that parses, (line number, None, error) for
    one that does not (json.JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8)."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            yield n, None, e
            continue
        yield n, value, None


def read_json_rows(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a JSONL file or a JSON array file, each with its location ('line 7' / 'item 7')."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows: list[tuple[str, dict]] = []
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise DataError(f"{path}: item {i}: expected a JSON object, got {type(item).__name__}")
            rows.append((f"item {i}", item))
        return rows
    for i, item, error in json_lines(text.splitlines()):
        if error is not None:
            raise DataError(f"{path}: line {i}: not valid JSON ({error.msg}); expected one JSON object per line")
        if not isinstance(item, dict):
            raise DataError(f"{path}: line {i}: expected a JSON object, got {type(item).__name__}")
        rows.append((f"line {i}", item))
    return rows
