"""The one reader of JSON rows: JSON Lines (one object per line, blank lines skipped but counted) and
JSON array files. Callers word their own errors from what it yields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from upstack.errors import DataError

TOO_DEEP = "nests too deeply for Python's JSON reader"


class NulBytes(ValueError):
    """A line holding NUL bytes (0x00): never JSON, and usually a binary or corrupt file."""

    def __init__(self, only_nul: bool):
        self.msg = f"{'is' if only_nul else 'contains'} NUL bytes (0x00): a binary or corrupt file?"
        super().__init__(self.msg)


def loads(text: str | bytes) -> Any:
    """json.loads, with nesting too deep for Python's recursive parser (RecursionError) reported as a
    JSONDecodeError like any other invalid JSON."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError(TOO_DEEP, "", 0) from None


def json_lines(lines: Iterable[str | bytes]) -> Iterator[tuple[int, Any, ValueError | None]]:
    """(line number, value, None) for each non-blank line that parses, (line number, None, error) for
    one that does not (json.JSONDecodeError, UnicodeDecodeError for bytes that are not UTF-8, NulBytes)."""
    return numbered_json_lines(enumerate(lines, 1))


def numbered_json_lines(lines: Iterable[tuple[int, str | bytes]]
                        ) -> Iterator[tuple[int, Any, ValueError | None]]:
    """json_lines of (line number, line) pairs (a reader that skips blank lines in bulk numbers them)."""
    for n, line in lines:
        if not line.strip():
            continue
        nul = b"\0" if isinstance(line, bytes) else "\0"
        if nul in line:  # before json.loads, whose encoding guess reads NULs as UTF-16/32
            yield n, None, NulBytes(not line.strip().strip(nul).strip())
            continue
        try:
            value = loads(line)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            yield n, None, e
            continue
        yield n, value, None


def line_error(error: ValueError) -> str:
    """How a reader words a bad line: 'is NUL bytes ...', 'is not valid UTF-8', 'is not valid JSON (...)'."""
    if isinstance(error, NulBytes):
        return error.msg
    if isinstance(error, UnicodeDecodeError):
        return "is not valid UTF-8"
    return f"is not valid JSON ({getattr(error, 'msg', error)})"


def read_json_rows(path: str | Path) -> list[tuple[str, dict]]:
    """Rows of a JSONL file or a JSON array file, each with its location ('line 7' / 'item 7').
    JSON Lines are read line by line (never the whole file as one string)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16).lstrip(b"\xef\xbb\xbf \t\r\n")
            fh.seek(0)
            if head.startswith(b"["):
                return _json_array_rows(path, fh.read())
            rows: list[tuple[str, dict]] = []
            lines = (line[3:] if n == 0 and line.startswith(b"\xef\xbb\xbf") else line for n, line in enumerate(fh))
            for i, item, error in json_lines(lines):
                if isinstance(error, json.JSONDecodeError):
                    raise DataError(f"{path}: line {i}: not valid JSON ({error.msg}); expected one JSON object per line")
                if error is not None:
                    raise DataError(f"{path}: line {i}: {line_error(error)}")
                if not isinstance(item, dict):
                    raise DataError(f"{path}: line {i}: expected a JSON object, got {type(item).__name__}")
                rows.append((f"line {i}", item))
            return rows
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a JSON or JSONL file") from None


def _json_array_rows(path: Path, data: bytes) -> list[tuple[str, dict]]:
    try:
        items = loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}: " if e.doc else ""
        raise DataError(f"{path}: not valid JSON ({where}{e.msg})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(items).__name__}")
    rows = []
    for i, item in enumerate(items, 1):
        if not isinstance(item, dict):
            raise DataError(f"{path}: item {i}: expected a JSON object, got {type(item).__name__}")
        rows.append((f"item {i}", item))
    return rows
