"""Block-wise reads of stored tensors for many threads at once (the streaming merge's inputs).

Inputs are memory-mapped: a block is a view of the page cache (no copy), and the pages a thread
touched are unmapped again (MADV_DONTNEED) when it reads its next block, so the resident set stays
at a few blocks per thread. Tensors whose offset does not suit their dtype, and pickled checkpoints,
are read with pread into the thread's own buffers instead.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable

from upstack.checkpoint.dtypes import DTYPE_SIZES, TORCH_DTYPE_NAMES
from upstack.checkpoint.reader import TensorRef, read_tensor_bytes
from upstack.errors import CheckpointError

USE_MMAP = True            # read inputs through memory maps (False: pread into per-thread buffers)
UNMAP_MARGIN = 256 << 10   # bytes beyond a block also unmapped after use (> the kernel's fault-around)


class TensorBlockReader:
    """Reads flat element ranges [a, b) of stored tensors as torch tensors of their own dtype.

    One reader serves every tensor of one job (the maps of its files are opened once); each thread
    keeps its own pread buffers and the list of mapped ranges to release. A block read by a thread is
    valid until that thread reads again. `close` drops the maps.
    """

    def __init__(self):
        self.maps: dict = {}
        self.local = threading.local()

    def _thread_state(self):
        st = self.local
        if not hasattr(st, "mapped"):
            st.mapped, st.bufs = [], {}
        return st

    def _buffer(self, key: str, nbytes: int):
        import torch

        bufs = self._thread_state().bufs
        buf = bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = bufs[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]

    def release(self) -> None:
        """Unmap the pages the calling thread's last block viewed."""
        st = self._thread_state()
        for mm, start, end in st.mapped:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        st.mapped.clear()

    def reader(self, refs: list[TensorRef]) -> Callable[[int, int], list]:
        """read_block(a, b): elements [a, b) of every tensor in `refs`, for the calling thread."""
        import torch

        dtypes = [getattr(torch, TORCH_DTYPE_NAMES[r.dtype]) for r in refs]
        maps = []
        for ref in refs:
            if ref.tensor is not None:
                maps.append(None)
                continue
            if ref.path not in self.maps:
                fd = os.open(ref.path, os.O_RDONLY)
                try:
                    # private copy-on-write mapping: writable for torch.frombuffer, never written
                    self.maps[ref.path] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                finally:
                    os.close(fd)
            aligned = ref.offset % DTYPE_SIZES[ref.dtype] == 0
            maps.append(self.maps[ref.path] if aligned and USE_MMAP else None)

        def read_block(a: int, b: int) -> list:
            self.release()
            mapped = self._thread_state().mapped
            xs = []
            for i, ref in enumerate(refs):
                size = DTYPE_SIZES[ref.dtype]
                if ref.tensor is not None:  # pickled checkpoint, already in memory
                    xs.append(torch.frombuffer(read_tensor_bytes(ref, a * size, b * size), dtype=dtypes[i]))
                elif maps[i] is not None:
                    start = ref.offset + a * size
                    xs.append(torch.frombuffer(maps[i], dtype=dtypes[i], count=b - a, offset=start))
                    # the kernel maps neighbouring pages on each fault (fault-around, 64 KB): release
                    # a margin beyond the block too, or those pages would stay mapped for good
                    lo = max(0, start - UNMAP_MARGIN)
                    mapped.append((maps[i], lo - lo % mmap.PAGESIZE,
                                   min(len(maps[i]), ref.offset + b * size + UNMAP_MARGIN)))
                else:
                    buf = self._buffer(f"input{i}", (b - a) * size)
                    xs.append(_pread(ref, a, b, buf).view(dtypes[i]))
            return xs

        return read_block

    def close(self) -> None:
        self.local = threading.local()  # drops the threads' buffers and views of the maps
        for mm in self.maps.values():
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the map goes when that does
                pass
        self.maps.clear()


def _pread(ref: TensorRef, a: int, b: int, buf):
    """Elements [a, b) of a stored tensor into `buf` (a uint8 torch tensor of their size)."""
    size = DTYPE_SIZES[ref.dtype]
    view, done = memoryview(buf.numpy()), 0
    with open(ref.path, "rb", buffering=0) as f:
        while done < len(view):
            got = os.preadv(f.fileno(), [view[done:]], ref.offset + a * size + done)
            if got <= 0:
                raise CheckpointError(f"{ref.path}: tensor {ref.name!r} is truncated")
            done += got
    return buf
