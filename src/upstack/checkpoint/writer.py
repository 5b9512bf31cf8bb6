"""Tensor plans and the one streaming sharded writer.

Plan, then stream: surgery (upscale, merge) builds a list of `TensorPlan`s, each saying how to make one
output tensor -- a byte-range copy of a source tensor, or a function yielding its bytes -- and
`write_checkpoint` validates the whole plan before it touches the output, then streams it into
sharded safetensors. Pure copies go through `os.copy_file_range` (kernel-side, never through Python
memory), so this module does not import torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import logging
import math
import os
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from upstack.checkpoint.dtypes import DTYPE_SIZES, TORCH_DTYPE_NAMES
from upstack.checkpoint.finite import all_finite, count_nonfinite
from upstack.checkpoint.reader import (
    TensorRef,
    aux_files,
    load_tensor,
    read_tensor_bytes,
    tensor_to_bytes,
)
from upstack.errors import CheckpointError
from upstack.outputs import atomic_output_dir

log = logging.getLogger(__name__)

@dataclasses.dataclass
class TensorPlan:
    """How to make one output tensor: copy a source byte range, or call `compute`.

    `compute()` yields bytes-like chunks whose total is exactly nbytes (so the largest tensors can be
    produced in row chunks); `description` is shown by --dry-run.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    copy: TensorRef | None = None
    compute: Callable[[], Iterable[bytes | bytearray | memoryview]] | None = None
    description: str = ""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def validate_plan(plans: list[TensorPlan]) -> None:
    """Check a whole plan before anything is written: unique names, known dtypes, consistent copies."""
    if not plans:
        raise CheckpointError("nothing to write: the plan has no tensors")
    seen = set()
    for p in plans:
        if p.name in seen:
            raise CheckpointError(f"plan error: tensor {p.name!r} is planned twice")
        seen.add(p.name)
        if p.dtype not in DTYPE_SIZES:
            raise CheckpointError(f"plan error: tensor {p.name!r} has unknown dtype {p.dtype!r}")
        if (p.copy is None) == (p.compute is None):
            raise CheckpointError(f"plan error: tensor {p.name!r} needs exactly one of copy or compute")
        if p.copy is not None and (p.copy.dtype != p.dtype or p.copy.nbytes != p.nbytes):
            raise CheckpointError(
                f"plan error: tensor {p.name!r} copies {p.copy.name!r} ({p.copy.dtype}{list(p.copy.shape)}) "
                f"but is planned as {p.dtype}{list(p.shape)}")


def cast_plan(name: str, ref: TensorRef, dtype: str) -> TensorPlan:
    """Cast a stored float tensor to `dtype`, in row chunks of about 64 MB; warns (once per tensor) when
    the output holds NaN or inf, from the source or from values beyond `dtype`'s range."""
    rows = ref.shape[0] if ref.shape else 1
    row_bytes = max(1, ref.nbytes // rows) if ref.shape else ref.nbytes

    def compute():
        import torch

        dt = getattr(torch, TORCH_DTYPE_NAMES[dtype])
        step = max(1, (64 << 20) // row_bytes)
        pieces = [None] if not ref.shape else [(a, min(rows, a + step)) for a in range(0, rows, step)]
        bad = bad_src = 0
        for piece in pieces:
            src = load_tensor(ref, piece)
            out = src.to(dt)
            if not all_finite(out):
                bad, bad_src = bad + count_nonfinite(out), bad_src + count_nonfinite(src)
            yield tensor_to_bytes(out)
        if bad:
            log.warning("tensor %s has %d non-finite value(s) (NaN or inf) after the cast to %s (%d already "
                        "in the source %s); written as they are", name, bad, dtype, bad_src, ref.name)

    return TensorPlan(name, dtype, ref.shape, compute=compute, description=f"cast {ref.name} -> {dtype}")


def source_plan(name: str, ref: TensorRef, dtype: str | None) -> TensorPlan:
    """`ref` as output tensor `name`: a byte copy, or a cast when `dtype` differs (floating tensors only)."""
    if dtype and dtype != ref.dtype and ref.dtype in ("F32", "F16", "BF16", "F64"):
        return cast_plan(name, ref, dtype)
    return TensorPlan(name, ref.dtype, ref.shape, copy=ref, description=f"copy {ref.name}")


def assign_shards(plans: list[TensorPlan], shard_size: int) -> list[list[TensorPlan]]:
    """Greedy in plan order: start a new shard when the next tensor would pass `shard_size`."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for p in plans:
        if shards[-1] and size + p.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def _shard_header(plans: list[TensorPlan], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    pos = 0
    for p in plans:
        header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [pos, pos + p.nbytes]}
        pos += p.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


_COPY_CHUNK = 64 << 20
_WRITEBACK_WINDOW = 64 << 20    # start the disk write of every 64 MB as soon as it is written ...
_WRITEBACK_LAG = 4              # ... and wait for the data 4 windows back (bounded dirty memory)


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None; looked up on first use, not at import."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4


class _WriteBehind:
    """Hands written data to the disk as the file grows (sync_file_range), rather than leaving gigabytes
    of dirty pages for a final sync: the disk writes while the next tensors are computed or copied, and
    the page cache never holds more than a few windows of unwritten output. `close` makes the file
    durable (fdatasync) before the output folder is renamed into place. Where sync_file_range is
    missing, only the fdatasync remains."""

    def __init__(self, fd: int):
        self.fd, self.pos, self.started = fd, 0, 0

    def advance(self, nbytes: int) -> None:
        self.pos += nbytes
        sfr = _sync_file_range()
        if sfr is None:
            return
        while self.pos - self.started >= _WRITEBACK_WINDOW:
            sfr(self.fd, self.started, _WRITEBACK_WINDOW, _SFR_WRITE)
            self.started += _WRITEBACK_WINDOW
            old = self.started - _WRITEBACK_LAG * _WRITEBACK_WINDOW
            if old >= 0:
                sfr(self.fd, old, _WRITEBACK_WINDOW, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER)

    def close(self) -> None:
        os.fdatasync(self.fd)


def _copy_range(src_fd: int, offset: int, nbytes: int, dst_fd: int, wrote: Callable[[int], None]) -> None:
    """Copy nbytes from src_fd at offset to dst_fd's current position, kernel-side when possible;
    `wrote(n)` after each piece."""
    done = 0
    use_cfr = hasattr(os, "copy_file_range")
    while done < nbytes:
        n = min(_COPY_CHUNK, nbytes - done)
        if use_cfr:
            try:
                got = os.copy_file_range(src_fd, dst_fd, n, offset + done)
            except OSError as e:
                if e.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                    use_cfr = False
                    continue
                raise
            if got == 0:
                raise CheckpointError("source file ended early while copying (was it modified during the write?)")
            done += got
            wrote(got)
        else:
            chunk = os.pread(src_fd, n, offset + done)
            if not chunk:
                raise CheckpointError("source file ended early while copying (was it modified during the write?)")
            _write_all(dst_fd, chunk)
            done += len(chunk)
            wrote(len(chunk))


def _write_all(fd: int, data) -> int:
    view = memoryview(data).cast("B")
    total = 0
    while total < len(view):
        total += os.write(fd, view[total:])
    return total


def copy_aux_files(src: Path | None, dst: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copy tokenizer, chat template and generation config files from a checkpoint folder.

    Every file is checked first (`aux_files`: none may link outside `src`, the Hugging Face cache's
    blobs/ excepted), so a refused link copies nothing; links are copied as the files they point to."""
    copied = []
    if src is None:
        return copied
    skip = set(skip)
    files = [f for f in aux_files(Path(src)) if f.name not in skip]
    for f in files:
        shutil.copy2(f.resolve(), dst / f.name)
        copied.append(f.name)
    return copied


def write_shards(plans: list[TensorPlan], folder: Path, *, shard_size: int = 5 * 10**9,
                 metadata: dict[str, str] | None = None, progress: bool = True, label: str | None = None) -> None:
    """Stream `plans` into safetensors shards (and the index when more than one) inside an existing
    folder that the caller renames into place when everything else is written."""
    validate_plan(plans)
    shards = assign_shards(plans, shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(p.nbytes for p in plans)
    meta = {"format": "pt", **(metadata or {})}
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {label or folder.name}", disable=not progress,
               leave=False)
    src_fds: dict[Path, int] = {}
    try:
        for shard_name, shard in zip(names, shards):
            _write_shard(folder / shard_name, shard, meta, src_fds, bar)
        if n > 1:
            weight_map = {p.name: shard_name for shard_name, shard in zip(names, shards) for p in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise _disk_full(folder, names, total, label) from None
        raise
    finally:
        bar.close()
        for fd in src_fds.values():
            os.close(fd)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.2f} MB"


def _disk_full(folder: Path, names: list[str], total: int, label: str | None) -> CheckpointError:
    """The disk filled while writing shards `names` into `folder`: remove them (the caller removes the
    folder), then say how much the tensors need and how much is free without them."""
    for name in names:
        with contextlib.suppress(OSError):
            (folder / name).unlink()
    try:
        free = f", and {_size(shutil.disk_usage(folder).free)} is free in {folder.parent}"
    except OSError:
        free = ""
    return CheckpointError(f"disk full while writing {label or folder}: the tensors need about {_size(total)}"
                           f"{free} (nothing was left behind)")


def write_checkpoint(
    plans: list[TensorPlan],
    out: str | Path,
    *,
    config: dict,
    aux_from: str | Path | None = None,
    shard_size: int = 5 * 10**9,
    overwrite: bool = False,
    model_card: str | None = None,
    extra_files: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
) -> Path:
    """Stream `plans` into a HF checkpoint folder `out`; atomic (temp sibling, renamed at the end).

    Writes model-0000i-of-0000N.safetensors shards (or model.safetensors when one shard), the index
    with metadata.total_size, config.json, the aux files of `aux_from`, README.md (`model_card`) and
    `extra_files` (name -> text). Memory use is bounded by the largest computed chunk.
    """
    validate_plan(plans)
    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_shards(plans, tmp, shard_size=shard_size, metadata=metadata, progress=progress, label=str(out))
        copy_aux_files(Path(aux_from) if aux_from else None, tmp, skip=set(extra_files or {}))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        if model_card is not None:
            (tmp / "README.md").write_text(model_card)
    return out


def _write_shard(path: Path, shard: list[TensorPlan], meta: dict, src_fds: dict[Path, int], bar) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        disk = _WriteBehind(fd)
        disk.advance(_write_all(fd, _shard_header(shard, meta)))
        for p in shard:
            if p.copy is not None and p.copy.tensor is None:
                src = src_fds.get(p.copy.path)
                if src is None:
                    src = src_fds[p.copy.path] = os.open(p.copy.path, os.O_RDONLY)
                _copy_range(src, p.copy.offset, p.nbytes, fd, disk.advance)
                bar.update(p.nbytes)
                continue
            chunks = p.compute() if p.compute is not None else [read_tensor_bytes(p.copy)]
            written = 0
            for chunk in chunks:
                n = _write_all(fd, chunk)
                written += n
                disk.advance(n)
                bar.update(n)
            if written != p.nbytes:
                raise CheckpointError(f"internal error: tensor {p.name!r} produced {written} bytes, "
                                      f"expected {p.nbytes}")
        disk.close()
    finally:
        os.close(fd)
