"""Block infrastructure shared by the merge kernels: the block size and per-thread scratch buffers."""

from __future__ import annotations

BLOCK = 1 << 20            # elements per compute block (4 MB in fp32) and per DARE random block


class Scratch:
    """Per-thread work buffers for the block kernels, reused block after block.

    Kernels write into these instead of allocating: a fresh allocation of a few MB is typically a
    fresh mmap that page-faults on first touch, which costs more than the arithmetic on it.
    """

    def __init__(self):
        self.bufs: dict = {}

    def get(self, key: str, n: int, dtype=None):
        import torch

        dtype = dtype or torch.float32
        buf = self.bufs.get((key, dtype))
        if buf is None or buf.numel() < n:
            buf = self.bufs[(key, dtype)] = torch.empty(max(n, BLOCK), dtype=dtype)
        return buf[:n]

    def f32(self, key: str, like):
        """A float32 buffer holding a copy of `like` (any float dtype)."""
        return self.get(key, like.numel()).copy_(like)


def serial_map(fn, items) -> list:
    return [fn(x) for x in items]


def block_ranges(s: int, e: int) -> list[tuple[int, int]]:
    return [(a, min(e, a + BLOCK)) for a in range(s, e, BLOCK)]
