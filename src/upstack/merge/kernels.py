"""The chunked driver of the block kernels, shared by the pure functions and the streaming merge.

Each chunk is computed in BLOCK-element blocks, in fp32; every reduction adds per-block results in
block order, so the bytes do not depend on the chunking or the number of workers. Methods that need
whole-tensor statistics make extra passes first (slerp: dot product and norms; ties: two histogram
passes for an exact top-k).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from upstack.checkpoint.finite import all_finite, nonfinite_error
from upstack.merge import blocks
from upstack.merge.blocks import Scratch, block_ranges, serial_map
from upstack.merge.methods import METHODS
from upstack.merge.methods.linear import affine_block, weighted_sum_block
from upstack.merge.methods.slerp import slerp_coefficients, slerp_stats
from upstack.merge.methods.task_arithmetic import task_vector_block
from upstack.merge.methods.ties import TopK, delta_bits
from upstack.merge.recipe import TensorRecipe


def compute_chunks(recipe: TensorRecipe, read_block: Callable, numel: int, chunk: int, out_dtype, *,
                   map_fn: Callable = serial_map, alloc: Callable | None = None,
                   scratch: Callable[[], Scratch] | None = None, refuse_nonfinite: str | None = None) -> Iterator:
    """Yield the merged tensor as flat chunks of `out_dtype`, `chunk` elements each (a multiple of BLOCK).

    `read_block(a, b, sc)` returns the inputs' flat elements [a, b) of one block (any float dtype) in
    the recipe's input order, valid until the same thread reads again. Blocks are computed by
    `map_fn(fn, items)` (a thread pool in the streaming merge), each thread reading its own ranges
    into its own `scratch()` buffers, so a block is read and computed while it is in the CPU's cache;
    every reduction adds per-block results in block order, so the bytes do not depend on the number
    of workers. `alloc(n, dtype)` gives the output chunk's buffer. Methods that need whole-tensor
    statistics read the inputs once (slerp) or twice (ties) more first. With `refuse_nonfinite` (the
    tensor's name), every block of output is checked while it is in cache (one min/max reduction) and a
    NaN or inf raises CheckpointError naming the tensor.
    """
    import torch

    if chunk % blocks.BLOCK:
        raise ValueError("chunk must be a multiple of BLOCK")
    alloc = alloc or (lambda n, dt: torch.empty(n, dtype=dt))
    if scratch is None:
        local = threading.local()

        def scratch() -> Scratch:
            if not hasattr(local, "sc"):
                local.sc = Scratch()
            return local.sc

    spec = METHODS[recipe.method]
    starts = range(0, numel, chunk)

    def each_block(fn) -> Iterator:
        """fn(a, b, xs, sc) over every block of the tensor, in order (one chunk's results at a time)."""
        def run(r):
            sc = scratch()
            return fn(r[0], r[1], read_block(r[0], r[1], sc), sc)
        for s in starts:
            yield from map_fn(run, block_ranges(s, min(numel, s + chunk)))

    coeffs = None
    topks: list[TopK] = []
    if recipe.method == "slerp":
        dot = sq0 = sq1 = 0.0
        for d, x, y in each_block(lambda a, b, xs, sc: slerp_stats(xs, sc)):
            dot, sq0, sq1 = dot + d, sq0 + x, sq1 + y
        s0, s1, _ = slerp_coefficients(dot, sq0, sq1, recipe.t, recipe.eps, recipe.dot_threshold)
        coeffs = [s0, s1]
    elif spec.trim == "magnitude":
        topks = [TopK(numel, d) for d in recipe.densities]
        selecting = [i for i, tk in enumerate(topks) if tk.mode == "select"]

        def hists(a, b, xs, sc):
            base = sc.f32("base", xs[0])
            return [topks[i].histogram(delta_bits(xs[1 + i], base, sc), sc) for i in selecting]

        for pass_no in (1, 2) if selecting else ():
            for i in selecting:
                topks[i].start(pass_no)
            for hs in each_block(hists):
                for i, h in zip(selecting, hs):
                    topks[i].add(h)
            for i in selecting:
                topks[i].finish()
    lerp_weight = None  # two-model average: x0 + c (x1 - x0), what affine_block computes
    if recipe.method == "linear" and recipe.normalize and len(recipe.weights) == 2:
        lerp_weight = recipe.weights[1] / sum(recipe.weights)
    seen = [0] * len(topks)  # ties: threshold-equal magnitudes met so far, per model
    for s in starts:
        e = min(numel, s + chunk)
        ranges = block_ranges(s, e)
        out = alloc(e - s, out_dtype)
        offsets = [[tk.need if tk.mode == "select" else 0 for tk in topks] for _ in ranges]
        counting = [i for i, tk in enumerate(topks) if tk.mode == "select" and seen[i] < tk.need]
        if counting:
            def count_equal(r):
                sc = scratch()
                xs = read_block(r[0], r[1], sc)
                base = sc.f32("base", xs[0])
                return [topks[i].count_equal(delta_bits(xs[1 + i], base, sc)) for i in counting]

            for j, counts in enumerate(map_fn(count_equal, ranges)):
                for i, c in zip(counting, counts):
                    offsets[j][i] = seen[i]
                    seen[i] += c

        def block(j: int, s=s, ranges=ranges, out=out, offsets=offsets) -> None:
            a, b = ranges[j]
            sc = scratch()
            xs = read_block(a, b, sc)
            if lerp_weight is not None and all(x.dtype == out_dtype for x in xs):
                # One pass: torch's lerp on bf16/fp16 computes in fp32 and rounds once, so this is the
                # fp32 result bit for bit (tests check it) at a quarter of the memory traffic.
                torch.lerp(xs[0], xs[1], lerp_weight, out=out[a - s:b - s])
            else:
                if recipe.method == "linear":
                    res = (affine_block(xs, recipe.weights, sc) if recipe.normalize
                           else weighted_sum_block(xs, recipe.weights, sc))
                elif recipe.method == "slerp":
                    res = weighted_sum_block(xs, coeffs, sc)
                else:
                    res = task_vector_block(recipe, spec, xs, a, b, topks, offsets[j], sc)
                out[a - s:b - s].copy_(res)
            if refuse_nonfinite is not None and not all_finite(out[a - s:b - s]):
                raise nonfinite_error(refuse_nonfinite)

        map_fn(block, range(len(ranges)))
        yield out


def run_in_memory(recipe: TensorRecipe, tensors: list):
    import torch

    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"tensors must have the same shape, got {list(shape)} and {list(t.shape)}")
    flats = [t.detach().reshape(-1) for t in tensors]
    numel = flats[0].numel()
    size = blocks.BLOCK
    chunk = max(size, -(-numel // size) * size)
    parts = list(compute_chunks(recipe, lambda a, b, sc: [f[a:b] for f in flats], numel, chunk, torch.float32))
    out = torch.cat(parts) if parts else torch.empty(0)
    return out.reshape(shape)
