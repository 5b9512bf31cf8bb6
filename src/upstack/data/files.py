"""Records of one local data file: JSONL, JSON array (parsed incrementally), parquet, CSV/TSV (each
optionally gzipped) and plain text (paragraphs, lines or the whole file).

A record is (row number, value, problem): problem is None or why the row could not be read, so that
the loaders can skip bad rows (skip_bad_rows) or report them with file and row.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import os
import re
import stat
import zlib
from pathlib import Path
from typing import Any, Iterator

from upstack.data.jsonl import TOO_DEEP, NulBytes, line_error, numbered_json_lines
from upstack.errors import DataError

ROW_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet",
                ".csv": "csv", ".tsv": "tsv"}
TEXT_SUFFIXES = {".txt": "txt", ".text": "txt", ".raw": "txt"}
_PEEK_LINES = 1000
_CHUNK = 1 << 20
CSV_FIELD_LIMIT = 2**31 - 1  # csv's default, 131072 characters, refuses a long document as a "field too large"


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


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def special_file_error(path: str | Path, flag: str = "") -> DataError | None:
    """A DataError saying what `path` is when it exists but is neither a regular file nor a folder (a FIFO
    would block the reader, /dev/zero never ends); None otherwise."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), None)
    if kind is None:
        return None
    return DataError(f"{flag + ' ' if flag else ''}{path}: is {kind}, not a regular file (reading it would block "
                     "or never end); give a data file or a folder of files")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def allow_long_csv_fields() -> None:
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)


def _guarded(read):
    """A reader of one file whose decompression and decoding errors, raised wherever the reading is
    (gzip decompresses as it goes, so a truncated .gz fails at its end), become one line naming the file."""
    @functools.wraps(read)
    def wrapper(path: Path, *args, **kwargs):
        try:
            result = read(path, *args, **kwargs)
            if not isinstance(result, Iterator):
                return result
            return _guard_iter(path, result)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise _corrupt(path, e) from None
    return wrapper


def _guard_iter(path: Path, records: Iterator) -> Iterator:
    try:
        yield from records
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise _corrupt(path, e) from None
    except UnicodeDecodeError as e:  # text-mode readers (CSV, JSON arrays) decode ahead of the row they yield
        raise DataError(f"{path}: is not valid UTF-8 text ({e.reason}); a binary or corrupt file?") from None


def _corrupt(path: Path, e: BaseException) -> DataError:
    why = str(e) or type(e).__name__
    return DataError(f"{path}: the gzip file is truncated or corrupt ({why})")


# A record is (row number, value, problem): problem is None or why the row could not be read.
Record = tuple[int, Any, "str | None"]


@_guarded
def iter_file_records(path: Path, *, columns: list[str] | None = None) -> Iterator[Record]:
    kind = file_type(path)
    if kind == "jsonl":
        yield from _iter_jsonl(path)
    elif kind == "json":
        yield from _iter_json(path)
    elif kind == "parquet":
        yield from _iter_parquet(path, columns)
    elif kind in ("csv", "tsv"):
        yield from _iter_csv(path, kind)
    else:
        raise AssertionError(kind)


def _iter_csv(path: Path, kind: str) -> Iterator[Record]:
    allow_long_csv_fields()
    n = 0
    with _open_text(path) as fh:
        reader = csv.DictReader(fh, delimiter="\t" if kind == "tsv" else ",")
        try:
            if reader.fieldnames is None:
                return
            for n, row in enumerate(reader, 1):
                if None in row:
                    yield n, row, f"has more values than the header has columns ({len(reader.fieldnames)})"
                else:
                    yield n, row, None
        except csv.Error as e:
            raise DataError(f"{path} row {n + 1}: not valid {kind.upper()} ({e})") from None


def _iter_jsonl(path: Path) -> Iterator[Record]:
    """Rows numbered by line (blank lines are skipped but counted); each line is read and parsed alone."""
    with open_binary(path) as fh:
        for n, value, error in numbered_json_lines(_without_bom(numbered_lines(fh))):
            yield n, value, None if error is None else line_error(error)


def _without_bom(lines: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    for n, line in lines:
        yield n, line[3:] if n == 1 and line.startswith(b"\xef\xbb\xbf") else line


def numbered_lines(fh) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for each line of a binary file (plain or gzip) but the blank ones (ASCII
    whitespace only), which are skipped in bulk: a run of them costs a few scans of the read buffer in C,
    not a Python step per line. A 1 MB gzip of newlines holds a billion lines: 9 minutes one by one."""
    n = 0
    while True:
        data = fh.peek(1)  # what the reader has buffered (at least 1 byte; empty at the end)
        if not data:
            return
        if data[:1].isspace():  # blank lines may start here
            space = len(data) - len(data.lstrip())
            end = data.rfind(b"\n", 0, space) + 1  # after the last blank line in the buffer
            if end:
                n += data.count(b"\n", 0, end)
                fh.read(end)
                if space == len(data):  # all of the buffer was blank: look at the next one
                    continue
        line = fh.readline()
        n += 1
        if not line.isspace():  # (strip() would copy a long line)
            yield n, line
        del line  # a long line is not held here while the caller works on it


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
                except RecursionError:
                    raise DataError(f"{path} row {n + 1}: not valid JSON ({TOO_DEEP})") from None
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


_JSON_SPACE = re.compile(r"[ \t\r\n]*")


def _skip_ws(buf: str, pos: int) -> int:
    """The first position from `pos` that is not JSON whitespace (a regex: a Python step per character took
    minutes over a gzip of blank lines)."""
    return _JSON_SPACE.match(buf, pos).end()


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


@_guarded
def guess_text_unit(path: Path) -> str:
    """paragraph if a blank line occurs among the first lines (up to 1000 lines or 1 MiB), else line."""
    seen = 0
    with open_binary(path) as fh:
        for i, line in enumerate(fh):
            if i >= _PEEK_LINES or seen > _CHUNK:
                break
            seen += len(line)
            if not line.strip():
                return "paragraph"
    return "line"


@_guarded
def iter_txt(path: Path, unit: str) -> Iterator[tuple[int, str, str | None]]:
    """(first line number, document, problem) per paragraph / line / file. A line of nothing but NUL
    bytes is a problem (a binary or corrupt file), not text."""
    with open_binary(path) as fh:
        if unit == "file":
            data = fh.read()
            try:
                yield 1, data.decode("utf-8-sig").replace("\r\n", "\n").strip(), None
            except UnicodeDecodeError as e:
                yield 1, "", f"is not valid UTF-8 (byte {e.start})"
            return
        para: list[str] = []
        start = last = 0
        for n, raw in numbered_lines(fh):  # blank lines are skipped: a gap in the numbers is one
            if para and n > last + 1:
                yield start, "\n".join(para).strip(), None
                para = []
            last = n
            end = len(raw)
            while end and raw[end - 1] in b"\r\n":
                end -= 1
            try:  # decoded without the line end, in one copy (decode().rstrip() made two of a 200 MB line)
                line = str(memoryview(raw)[:end], "utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                yield n, "", "is not valid UTF-8"
                continue
            del raw
            if "\0" in line and not line.replace("\0", "").strip():  # a stray NUL in text is kept as text
                yield n, "", NulBytes(True).msg
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
