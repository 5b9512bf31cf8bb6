"""Remove training rows that share a long n-gram with a benchmark example (the usual pre-SFT cleaning).

Text is normalised the same way on both sides (`words()`): lowercase, ASCII and common Unicode
punctuation deleted, split on whitespace. An n-gram is `ngram` (default 13) consecutive words of one
string (a row's string fields are checked separately, nested lists/dicts such as chat `messages`
included). The benchmarks' n-grams become one sorted array of 64-bit hashes, with a bitmask of the
benchmarks each came from and a bit table in front of it. The training file is streamed in chunks of
rows: each chunk is parsed with one JSON call, its words are hashed with numpy straight from the
UTF-8 bytes (no Python object per word), and its n-gram hashes are looked up in the array. Memory is
bounded by the benchmarks and one chunk, never by the training set. Kept rows are copied byte for
byte to `out`; removed rows go to a side file with the benchmarks they matched and the first
matching n-gram. Both are written to temporary files and renamed at the end.

Benchmark examples shorter than `ngram` words cannot match and are counted as `short_examples`.
Word and n-gram hashes are 64-bit: a false match needs a hash collision (for a benchmark set of
10**6 n-grams, about one in 10**13 per training n-gram).
"""

from __future__ import annotations

import json
import logging
import math
import string
import time
from dataclasses import dataclass, field
from pathlib import Path

from upstack.data.benchmarks import benchmark_examples, parse_benchmark, strings_in
from upstack.data.jsonl import json_lines, line_error
from upstack.data.ngrams import UNICODE_PUNCTUATION, words
from upstack.errors import ConfigError, DataError
from upstack.outputs import atomic_file, check_output_free

log = logging.getLogger(__name__)

_UNI_SPACE = "".join(c for c in map(chr, range(0x80, 0x3001)) if c.isspace())  # what str.split() splits on
_NON_ASCII = str.maketrans({**{c: None for c in UNICODE_PUNCTUATION}, **{c: " " for c in _UNI_SPACE}})
_BYTE_SPACE = bytes(32 if c in b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f" else c for c in range(256))
_BYTE_PUNCT = string.punctuation.encode()
_MULT = 0x9E3779B97F4A7C15  # odd 64-bit multiplier of the polynomial n-gram hash
CHUNK_ROWS = 4096


@dataclass
class DecontaminateConfig:
    data: str  # training JSONL
    against: list[str]  # benchmark files or folders, optionally NAME=PATH
    out: str  # kept rows (JSONL)
    removed: str | None = None  # removed rows (default: OUT with .removed.jsonl)
    ngram: int = 13
    fields: list[str] = field(default_factory=list)  # top-level fields to check (default: every string)
    overwrite: bool = False


def check_config(cfg: DecontaminateConfig) -> None:
    """The values of a decontaminate run (no file is read: inputs may come from earlier stages)."""
    if cfg.ngram < 1:
        raise ConfigError(f"--ngram must be at least 1, got {cfg.ngram}")
    if not cfg.against:
        raise ConfigError("give at least one benchmark: --against FILE ...")


def _powers(n: int):
    import numpy as np

    # p[j] multiplies word j of the window: _MULT ** (n - 1 - j) mod 2**64
    return np.array([pow(_MULT, n - 1 - j, 1 << 64) for j in range(n)], dtype=np.uint64)


_BYTE_POWERS = None


def _byte_powers(n: int):
    """B**k mod 2**64 for k < n (B = the FNV prime), cached and grown on demand."""
    global _BYTE_POWERS
    import numpy as np

    if _BYTE_POWERS is None or len(_BYTE_POWERS) < n:
        size = max(n, 4096)
        p = np.empty(size, dtype=np.uint64)
        p[0] = 1
        p[1:] = np.cumprod(np.full(size - 1, 0x100000001B3, dtype=np.uint64))  # wraps mod 2**64
        _BYTE_POWERS = p
    return _BYTE_POWERS


def _mix(x):
    """splitmix64 finaliser: spreads a polynomial hash over all 64 bits (in place)."""
    import numpy as np

    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def word_hashes(strings: list[str]):
    """(64-bit hash of every normalised word of `strings`, index of the string it came from).

    The same words as `words()` gives, without making a Python object per word: the strings are
    joined with NUL, lowercased and encoded once; ASCII punctuation is deleted and odd whitespace made
    a space with `bytes.translate`; numpy then finds the words and hashes their bytes (a polynomial,
    mixed with the length and splitmix64).
    """
    import numpy as np

    prepared = [x if x.isascii() else x.translate(_NON_ASCII) for x in strings]
    text = "\x00".join(prepared)
    if text.count("\x00") != len(strings) - 1:  # a string holds NUL itself: make it a space
        text = "\x00".join(x.replace("\x00", " ") for x in prepared)
    raw = text.lower().encode("utf-8", "surrogatepass").translate(_BYTE_SPACE, _BYTE_PUNCT)
    a = np.frombuffer(raw, dtype=np.uint8)
    in_word = (a != 32) & (a != 0)
    edges = np.diff(in_word.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    lengths = np.flatnonzero(edges == -1) - starts
    string_of = np.searchsorted(np.flatnonzero(a == 0), starts)  # NULs before a word = its string
    word_bytes = a[in_word].astype(np.uint64)
    first = np.zeros(len(starts), dtype=np.int64)
    np.cumsum(lengths[:-1], out=first[1:])
    pos = np.arange(len(word_bytes), dtype=np.int64) - np.repeat(first, lengths)
    h = np.add.reduceat(word_bytes * _byte_powers(int(lengths.max()))[pos], first)
    h ^= lengths.astype(np.uint64) * np.uint64(_MULT)
    return _mix(h), string_of


def chunk_ngrams(strings: list[str], n: int):
    """N-gram hashes of many strings at once: (hashes, string index, start word in the chunk, string_of).

    An n-gram's hash is a polynomial over its word hashes mod 2**64, computed with numpy for the
    whole chunk. N-grams never span two strings.
    """
    import numpy as np

    h, string_of = word_hashes(strings)
    empty = np.zeros(0, dtype=np.int64)
    if len(h) < n:
        return np.zeros(0, dtype=np.uint64), empty, empty, empty
    m = len(h) - n + 1
    powers = _powers(n)
    g = h[:m] * powers[0]
    for j in range(1, n):
        g += h[j:j + m] * powers[j]
    starts = np.flatnonzero(string_of[:m] == string_of[n - 1:])  # windows inside one string
    return g[starts], string_of[starts], starts, string_of


@dataclass
class BenchmarkIndex:
    names: list[str]
    paths: list[str]
    hashes: object  # sorted unique uint64 n-gram hashes
    masks: object  # uint64 bitmask of the benchmarks each hash came from
    bloom: object  # bit table over the top `bloom_bits` bits of the hashes: a cheap first test
    bloom_bits: int
    stats: dict

    def lookup(self, g):
        """(positions in g that are benchmark n-grams, their benchmark bitmasks)."""
        import numpy as np

        if len(self.hashes) == 0 or len(g) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        q = g >> np.uint64(64 - self.bloom_bits)
        maybe = np.flatnonzero((self.bloom[q >> np.uint64(3)] >> (q & np.uint64(7)).astype(np.uint8)) & 1)
        pos = np.searchsorted(self.hashes, g[maybe])
        pos[pos == len(self.hashes)] = 0
        found = self.hashes[pos] == g[maybe]
        return maybe[found], self.masks[pos[found]]


def build_index(specs: list[str], n: int) -> BenchmarkIndex:
    """Hash every n-gram of every benchmark example (question + gold answer text)."""
    import numpy as np


    if len(specs) > 64:
        raise ConfigError(f"at most 64 benchmarks per run, got {len(specs)}")
    names, paths, all_h, all_b, stats = [], [], [], [], {}
    for b, spec in enumerate(specs):
        name, path = parse_benchmark(spec)
        if name in stats:
            raise ConfigError(f"two benchmarks are named {name!r}; name them: --against NAME=PATH")
        fmt, texts = benchmark_examples(path)
        short = sum(1 for t in texts if len(words(t)) < n)
        hashes = np.unique(chunk_ngrams(texts, n)[0])
        all_h.append(hashes)
        all_b.append(np.full(len(hashes), 1 << b, dtype=np.uint64))
        names.append(name)
        paths.append(path)
        stats[name] = {"path": path, "format": fmt, "examples": len(texts), "short_examples": short,
                       "ngrams": int(len(hashes)), "rows_removed": 0}
        if short:
            log.info("%s: %d of %d examples are shorter than %d words and cannot match", name, short, len(texts), n)
    h = np.concatenate(all_h) if all_h else np.zeros(0, dtype=np.uint64)
    bits = np.concatenate(all_b) if all_b else np.zeros(0, dtype=np.uint64)
    uniq, inv = np.unique(h, return_inverse=True)
    masks = np.zeros(len(uniq), dtype=np.uint64)
    np.bitwise_or.at(masks, inv, bits)
    # ~32 table bits per n-gram: about 3% of clean n-grams reach the binary search
    k = int(min(33, max(20, math.ceil(math.log2(max(1, len(uniq)) * 32)))))
    bloom = np.zeros(1 << (k - 3), dtype=np.uint8)
    q = uniq >> np.uint64(64 - k)
    np.bitwise_or.at(bloom, q >> np.uint64(3), np.left_shift(1, (q & np.uint64(7)).astype(np.uint8)).astype(np.uint8))
    return BenchmarkIndex(names, paths, uniq, masks, bloom, k, stats)


def scan_chunk(rows: list, index: BenchmarkIndex, n: int, fields: list[str]):
    """Per row of the chunk: (benchmark bitmask, first matching n-gram or None)."""
    import numpy as np

    strings: list[str] = []
    owner: list[int] = []
    for r, row in enumerate(rows):
        before = len(strings)
        if fields:
            if isinstance(row, dict):
                for f in fields:
                    if f in row:
                        strings += strings_in(row[f])
        elif type(row) is dict and all(type(v) is str for v in row.values()):
            strings += row.values()  # the common flat row
        else:
            strings += strings_in(row)
        owner += [r] * (len(strings) - before)
    masks = np.zeros(len(rows), dtype=np.uint64)
    first: dict[int, str] = {}
    if not strings:
        return masks, first
    g, string_of, starts, word_string = chunk_ngrams(strings, n)
    hit, hit_masks = index.lookup(g)
    if len(hit):
        hit_strings = string_of[hit]
        offset = starts[hit] - np.searchsorted(word_string, hit_strings)  # word offset within its string
        hit_rows = np.asarray(owner, dtype=np.int64)[hit_strings]
        np.bitwise_or.at(masks, hit_rows, hit_masks)
        for r, k, off in zip(hit_rows.tolist(), hit_strings.tolist(), offset.tolist()):
            if r not in first:  # the words themselves were not kept: recompute them for the report
                first[r] = " ".join(words(strings[k])[off:off + n])
    return masks, first


def _parse_chunk(lines: list[tuple[int, bytes]], data: Path) -> list:
    """JSON rows of a chunk of lines: one parse of the whole chunk, or line by line to find a bad one."""
    try:
        rows = json.loads(b"[" + b",".join(raw for _, raw in lines) + b"]")
        if len(rows) == len(lines):
            return rows
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply: find the line
        pass
    rows = []
    for (no, _), (_, row, error) in zip(lines, json_lines(raw for _, raw in lines)):
        if error is not None:
            raise _not_json(data, no, error)
        rows.append(row)
    return rows


def _not_json(data: Path, no: int, error: ValueError) -> DataError:
    if isinstance(error, json.JSONDecodeError):
        return DataError(f"{data}: line {no}: not valid JSON ({error.msg}); expected one JSON object per line")
    return DataError(f"{data}: line {no}: {line_error(error)}")


def decontaminate(cfg: DecontaminateConfig) -> dict:
    """Stream `cfg.data`, write rows without benchmark n-grams to `cfg.out`, the others to the side file."""
    from tqdm.auto import tqdm

    check_config(cfg)
    data, out = Path(cfg.data), Path(cfg.out)
    removed = Path(cfg.removed) if cfg.removed else out.with_name(out.name.removesuffix(".jsonl") + ".removed.jsonl")
    if not data.is_file():
        raise DataError(f"{data}: file not found")
    if out.resolve() == data.resolve() or removed.resolve() == data.resolve():
        raise ConfigError("--out (and the removed-rows file) must differ from the input file")
    for p in (out, removed):
        check_output_free(p, cfg.overwrite)
    _check_first_row(data, cfg.fields)

    t0 = time.perf_counter()
    index = build_index(cfg.against, cfg.ngram)
    t_index = time.perf_counter() - t0
    n_rows = n_removed = 0
    per_bench = [0] * len(index.names)
    progress = tqdm(total=data.stat().st_size, unit="B", unit_scale=True, desc="decontaminate")
    try:
        with atomic_file(out) as tmp_out, atomic_file(removed) as tmp_rm:
            with open(data, "rb") as fin, open(tmp_out, "wb", buffering=1 << 20) as fout, \
                    open(tmp_rm, "w", encoding="utf-8") as frm:
                lines: list[tuple[int, bytes]] = []
                line_no = 0
                while True:
                    line = fin.readline()
                    if line:
                        line_no += 1
                        if line.strip():
                            lines.append((line_no, line))
                    if lines and (len(lines) >= CHUNK_ROWS or not line):
                        rows = _parse_chunk(lines, data)
                        masks, first = scan_chunk(rows, index, cfg.ngram, cfg.fields)
                        kept = []
                        for r, ((no, raw), m) in enumerate(zip(lines, masks.tolist())):
                            if not m:
                                kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
                                continue
                            hit = [name for b, name in enumerate(index.names) if m >> b & 1]
                            for b in range(len(index.names)):
                                if m >> b & 1:
                                    per_bench[b] += 1
                            frm.write(json.dumps({"line": no, "benchmarks": hit, "ngram": first.get(r),
                                                  "row": rows[r]}, ensure_ascii=False) + "\n")
                            n_removed += 1
                        fout.write(b"".join(kept))
                        n_rows += len(lines)
                        progress.update(sum(len(raw) for _, raw in lines))
                        lines = []
                    if not line:
                        break
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    for b, name in enumerate(index.names):
        index.stats[name]["rows_removed"] = per_bench[b]
    return {"data": str(data), "out": str(out), "removed_file": str(removed), "ngram": cfg.ngram,
            "fields": cfg.fields or "all string fields", "rows": n_rows, "kept": n_rows - n_removed,
            "removed": n_removed, "benchmarks": index.stats, "seconds": round(seconds, 3),
            "index_seconds": round(t_index, 3), "rows_per_second": round(n_rows / max(seconds - t_index, 1e-9))}


def _check_first_row(data: Path, fields: list[str]) -> None:
    """Fail before any work on a file that is not JSONL, or when none of --fields is in its first row."""
    with open(data, "rb") as fh:
        for no, row, error in json_lines(fh):
            if error is not None:
                raise _not_json(data, no, error) from None
            if fields and (not isinstance(row, dict) or not any(f in row for f in fields)):
                have = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{data}: line {no}: none of the fields {', '.join(fields)} (row has: {have})")
            return
    raise DataError(f"{data}: no rows")


def format_report(report: dict) -> str:
    lines = [f"{report['rows']} rows: kept {report['kept']}, removed {report['removed']} "
             f"({report['ngram']}-gram overlap) in {report['seconds']:.1f} s ({report['rows_per_second']} rows/s)",
             f"  kept rows    -> {report['out']}", f"  removed rows -> {report['removed_file']}"]
    for name, s in report["benchmarks"].items():
        lines.append(f"  {name}: {s['rows_removed']} rows removed ({s['examples']} examples, {s['ngrams']} n-grams"
                     + (f", {s['short_examples']} too short to match" if s["short_examples"] else "") + ")")
    return "\n".join(lines)
