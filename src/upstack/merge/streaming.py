"""Streaming: the merged tensors computed chunk by chunk in a background thread, ahead of the writer.

A plan's `compute` streams its tensor in output chunks of CHUNK_BYTES, produced by one background
thread that runs a few chunks ahead of the writer, across tensor boundaries; each chunk is computed
in blocks by a pool of threads that read their blocks through checkpoint's `TensorBlockReader`
(memory-mapped inputs). Buffers are reused from block to block, so memory stays flat.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from upstack.checkpoint import (
    DTYPE_SIZES,
    TORCH_DTYPE_NAMES,
    TensorBlockReader,
    TensorPlan,
    TensorRef,
    tensor_to_bytes,
)
from upstack.merge import blocks, kernels
from upstack.merge.blocks import Scratch
from upstack.merge.recipe import TensorRecipe

CHUNK_BYTES = 16 << 20     # output bytes per chunk (whole blocks), the unit handed to the writer
PREFETCH = 4               # computed chunks queued ahead of the writer (ring of PREFETCH + 2 buffers)


def chunk_elements(out_dtype: str) -> int:
    """Elements per output chunk (whole blocks, about CHUNK_BYTES of output)."""
    return blocks.BLOCK * max(1, CHUNK_BYTES // (DTYPE_SIZES[out_dtype] * blocks.BLOCK))


def default_workers() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(8, os.cpu_count() or 1))


class Workspace:
    """What every tensor of one streaming merge shares (one tensor is computed at a time): a thread
    pool for the blocks of a chunk, each thread with its own scratch buffers, the inputs' block
    reader (memory maps), and a ring of output buffers handed to the writer and reused once
    written. Nothing is allocated per block or per chunk, so memory stays flat.
    """

    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="upstack-merge") if workers > 1 else None
        self.local = threading.local()
        self.out_bufs: list = [None] * (PREFETCH + 2)
        self.inputs = TensorBlockReader()

    def map(self, fn, items) -> list:
        return list(self.pool.map(fn, items)) if self.pool is not None else [fn(x) for x in items]

    def scratch(self) -> Scratch:
        """This thread's kernel buffers (kept for the whole merge)."""
        sc = getattr(self.local, "sc", None)
        if sc is None:
            sc = self.local.sc = Scratch()
        return sc

    def out_buffer(self, i: int, nbytes: int):
        import torch

        if self.out_bufs[i] is None or self.out_bufs[i].numel() < nbytes:
            self.out_bufs[i] = None
            self.out_bufs[i] = torch.empty(nbytes, dtype=torch.uint8)
        return self.out_bufs[i][:nbytes]

    def block_reader(self, refs: list[TensorRef]):
        """read_block(a, b, sc): elements [a, b) of every input, for the calling thread (see
        checkpoint.TensorBlockReader: memory-mapped, pages released block by block)."""
        read = self.inputs.reader(refs)
        return lambda a, b, sc: read(a, b)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.local = threading.local()  # drops the threads' scratch buffers
        self.inputs.close()


@dataclasses.dataclass
class _Job:
    recipe: TensorRecipe
    refs: list[TensorRef]
    numel: int
    out_dtype: str
    refuse_nonfinite: str | None = None  # the tensor's name, unless non-finite values are allowed


class Pipeline:
    """Computes the merged tensors of one merge, in plan order, in one background thread that runs
    ahead of the writer across tensor boundaries (so slerp's and ties' statistics passes for the
    next tensor overlap the writing of this one).

    The producer takes an output buffer from the ring, fills it with a chunk and queues it; the
    writer's `stream(j)` yields the chunks of job j, and each buffer returns to the ring when the
    writer asks for the next chunk (by then it has been written: the writer never keeps a chunk).
    Jobs must be streamed in order; asking for any other job restarts the producer there.
    """

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.jobs: list[_Job] = []
        self.thread: threading.Thread | None = None
        self.expect = -1

    def add(self, job: _Job) -> int:
        self.jobs.append(job)
        return len(self.jobs) - 1

    def _start(self, first: int) -> None:
        self.stop()
        self.free: queue.Queue = queue.Queue()
        for i in range(len(self.ws.out_bufs)):
            self.free.put(i)
        self.ready: queue.Queue = queue.Queue()
        self.halt = threading.Event()
        self.thread = threading.Thread(target=self._produce, args=(first,), name="upstack-merge-producer",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.halt.set()
            self.thread.join()
            self.thread = None
            self.expect = -1

    def _produce(self, first: int) -> None:
        import torch

        ws, free, ready, halt = self.ws, self.free, self.ready, self.halt
        pending: list[int] = []

        def alloc(n: int, dtype):
            while True:
                if halt.is_set():
                    raise _Stopped
                try:
                    i = free.get(timeout=0.1)
                    break
                except queue.Empty:
                    continue
            pending.append(i)
            nbytes = n * torch.empty((), dtype=dtype).element_size()
            return ws.out_buffer(i, nbytes).view(dtype)

        def map_fn(fn, items) -> list:  # stop within one chunk's work when the writer gives up
            if halt.is_set():
                raise _Stopped
            return ws.map(fn, items)

        try:
            for j in range(first, len(self.jobs)):
                job = self.jobs[j]
                dt = getattr(torch, TORCH_DTYPE_NAMES[job.out_dtype])
                for out in kernels.compute_chunks(job.recipe, ws.block_reader(job.refs), job.numel,
                                          chunk_elements(job.out_dtype), dt, map_fn=map_fn, alloc=alloc,
                                          scratch=ws.scratch, refuse_nonfinite=job.refuse_nonfinite):
                    ready.put(("item", j, (pending.pop(), out)))
                ready.put(("done", j, None))
                if halt.is_set():
                    return
        except _Stopped:
            return
        except BaseException as e:  # handed to the writer's thread, which re-raises it
            ready.put(("error", None, e))

    def stream(self, j: int) -> Iterator:
        """The bytes of job j's tensor, chunk by chunk."""
        if self.thread is None or self.expect != j:
            self._start(j)
        held = None
        finished = False
        try:
            while True:
                kind, job, item = self.ready.get()
                if held is not None:
                    self.free.put(held)
                    held = None
                if kind == "error":
                    raise item
                if job != j:
                    raise AssertionError(f"merge pipeline out of order: got job {job}, expected {j}")
                if kind == "done":
                    finished = True
                    self.expect = j + 1
                    return
                held, out = item
                yield tensor_to_bytes(out)
        finally:
            if not finished:  # the writer stopped early (an error elsewhere): stop producing
                self.stop()


class _Stopped(Exception):
    """The writer stopped reading (an error elsewhere): the producer thread ends quietly."""


def tensor_plan(pipe: Pipeline, name: str, shape: tuple, out_dtype: str, recipe: TensorRecipe,
                refs: list[TensorRef], description: str, allow_nonfinite: bool = False) -> TensorPlan:
    """The plan of one merged tensor, streamed by `pipe`; a NaN or inf in it fails the write unless
    `allow_nonfinite`."""
    j = pipe.add(_Job(recipe, refs, math.prod(shape), out_dtype, None if allow_nonfinite else name))
    return TensorPlan(name, out_dtype, tuple(shape), description=description, compute=lambda: pipe.stream(j))
