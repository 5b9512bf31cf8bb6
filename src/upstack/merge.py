"""Merge fine-tuned variants of one model: linear/average, SLERP, task arithmetic, TIES, DARE.

SOLAR-10.7B-Instruct is a merge (arXiv 2312.15166, sec. 4.3): weighted averages (0.5/0.5, 0.4/0.6,
0.6/0.4) and SLERP of DPO models that are strong at different tasks. The merge methods here follow
mergekit's conventions (its YAML config format included), so a mergekit config runs unchanged.

Plan, then stream: `merge` checks the models against each other, resolves every parameter for every
tensor, and builds one `TensorPlan` per output tensor; `write_checkpoint` (the same writer as
`upstack upscale`) validates the plan and writes atomically. A plan's `compute` streams its tensor in
output chunks of CHUNK_BYTES, produced by one background thread that runs a few chunks ahead of the
writer, across tensor boundaries; each chunk is computed in BLOCK-element blocks, in fp32, by a pool
of threads that read their blocks from memory-mapped inputs. Buffers are reused from block to block,
so memory stays flat whatever the model size.

Methods that need whole-tensor statistics make extra passes first:
  slerp  one pass for the dot product and both norms, then interpolates block by block;
  ties   an exact top-k by magnitude without holding the tensor: two histogram passes over the fp32
         bit patterns of |delta| (radix select on the high, then the low 16 bits) find the k-th
         largest magnitude; entries above it are kept, and entries equal to it in flat index order
         until exactly k are kept (the order a stable descending sort gives).
  dare   no statistics: the keep mask of element i of a tensor depends only on (seed, tensor name,
         model index, i), drawn in fixed BLOCK-aligned blocks, so chunking never changes the bytes.

The pure tensor functions (`linear`, `slerp`, `task_arithmetic`, `ties`, `dare`) run the same block
kernels on in-memory tensors, so library users and tests get exactly what the command writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from upstack import __version__
from upstack.arch import GENERIC, get_arch, split_layer_name
from upstack.checkpoint import (
    DTYPE_SIZES, TORCH_DTYPE_NAMES, Checkpoint, TensorPlan, TensorRef, assign_shards, normalize_dtype,
    open_checkpoint, read_tensor_bytes, write_checkpoint,
)
from upstack.config import config_from_dict, parse_bytes
from upstack.errors import CheckpointError, ConfigError, UpstackError
from upstack.outputs import check_output_free

BLOCK = 1 << 20            # elements per compute block (4 MB in fp32) and per DARE random block
CHUNK_BYTES = 16 << 20     # output bytes per chunk (whole blocks), the unit handed to the writer
USE_MMAP = True            # read inputs through memory maps (False: pread into per-thread buffers)
UNMAP_MARGIN = 256 << 10   # bytes beyond a block also unmapped after use (> the kernel's fault-around)
PREFETCH = 4               # computed chunks queued ahead of the writer (ring of PREFETCH + 2 buffers)
SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
LM_HEAD = "lm_head.weight"
EMBED_SUFFIX = "embed_tokens.weight"
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    needs_base: bool
    defaults: dict            # parameter -> default (REQUIRED when it has none)
    per_model: tuple = ()     # parameters a model entry may set for itself
    consensus: bool = False   # TIES sign election
    trim: str | None = None   # "magnitude" (TIES) or "random" (DARE)
    doc: str = ""


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(False, {"weight": 1.0, "normalize": True}, ("weight",),
                         doc="sum_i w_i theta_i / sum_i w_i"),
    "slerp": MethodSpec(False, {"t": REQUIRED}, (), doc="spherical interpolation of two models"),
    "task_arithmetic": MethodSpec(True, {"weight": 1.0, "lambda": 1.0, "normalize": False}, ("weight",),
                                  doc="base + lambda sum_i w_i (theta_i - base)"),
    "ties": MethodSpec(True, {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": True},
                       ("weight", "density"), consensus=True, trim="magnitude",
                       doc="trim to top density by magnitude, elect signs, average agreeing deltas"),
    "dare_linear": MethodSpec(True, {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": False,
                                     "rescale": True}, ("weight", "density"), trim="random",
                              doc="random drop (keep prob. density), rescale 1/density, task arithmetic"),
    "dare_ties": MethodSpec(True, {"weight": 1.0, "density": 1.0, "lambda": 1.0, "normalize": True,
                                   "rescale": True}, ("weight", "density"), consensus=True, trim="random",
                            doc="random drop and rescale, then TIES sign election"),
}
ALIASES = {"average": "linear"}
BOOL_PARAMS = ("normalize", "rescale")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelEntry:
    """One input model: a checkpoint folder, and its own parameters (mergekit: `parameters`)."""

    model: str
    weight: Any = None              # shortcut for parameters.weight
    parameters: dict | None = None


@dataclasses.dataclass
class MergeConfig:
    """Options of `upstack merge` (CLI flags and the YAML config fill the same fields)."""

    models: list[ModelEntry]
    method: str
    base: str | None = None
    # name -> setting: a number, a bool, a list of numbers (a gradient over layer depth), or a list of
    # {filter: substring, value: setting} tried in order (an entry without filter is the default).
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    dtype: str | None = None        # output dtype; default: each tensor's dtype in the base/first model
    seed: int = 0
    out: str | None = None
    overwrite: bool = False
    dry_run: bool = False
    shard_size: str = "5GB"
    allow_pickle: bool = False
    quiet: bool = False
    workers: int | None = None      # compute threads (default: the CPUs this process may use, at most 8)


def normalize_config_dict(data: dict) -> dict:
    """Accept mergekit spellings: merge_method -> method, base_model -> base, `- path` model entries."""
    if not isinstance(data, dict):
        raise ConfigError(f"merge config must be a mapping, got {type(data).__name__}")
    data = dict(data)
    for theirs, ours in (("merge_method", "method"), ("base_model", "base")):
        if theirs in data:
            if ours in data:
                raise ConfigError(f"merge config sets both {theirs!r} and {ours!r}; use one")
            data[ours] = data.pop(theirs)
    if isinstance(data.get("models"), list):
        data["models"] = [{"model": m} if isinstance(m, str) else m for m in data["models"]]
    if data.get("parameters") is None and "parameters" in data:
        data["parameters"] = {}
    return data


def config_from_yaml(path: str | Path, **overrides) -> MergeConfig:
    """Read a merge YAML file (our keys or mergekit's); `overrides` (not None) replace its values."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
    data = normalize_config_dict(data if data is not None else {})
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(MergeConfig, data, str(path))


# --------------------------------------------------------------------------------------------------
# Parameter settings: scalars, gradients over depth, per-tensor-group filters (mergekit's format)
# --------------------------------------------------------------------------------------------------

def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_range(pname: str, v, where: str) -> None:
    if pname in BOOL_PARAMS:
        if not isinstance(v, bool):
            raise ConfigError(f"{where}: {pname} must be true or false, got {v!r}")
        return
    if not _is_number(v) or not math.isfinite(v):
        raise ConfigError(f"{where}: {pname} must be a finite number, got {v!r}")
    if pname == "t" and not 0 <= v <= 1:
        raise ConfigError(f"{where}: t={v:g} is out of range (0 <= t <= 1; t=0 is the first model)")
    if pname == "density" and not 0 < v <= 1:
        raise ConfigError(f"{where}: density={v:g} is out of range (0 < density <= 1: the fraction of "
                          "each task vector kept)")


def check_setting(pname: str, setting, where: str):
    """Validate one parameter setting; return it in canonical form (a single condition becomes a list)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"{where}: {pname} is an empty list")
        if all(_is_number(v) for v in setting):
            if pname in BOOL_PARAMS:
                raise ConfigError(f"{where}: {pname} must be true or false, not a list")
            for v in setting:
                _check_range(pname, v, where)
            return [float(v) for v in setting]
        out = []
        for i, cond in enumerate(setting):
            w = f"{where}[{i}]"
            if not isinstance(cond, dict):
                raise ConfigError(f"{w}: expected a number, or {{filter: ..., value: ...}} entries; got {cond!r}")
            unknown = sorted(set(cond) - {"filter", "value"})
            if unknown:
                raise ConfigError(f"{w}: unknown key(s) {', '.join(unknown)} (a condition has filter and value)")
            if "value" not in cond:
                raise ConfigError(f"{w}: missing 'value'")
            flt = cond.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ConfigError(f"{w}: filter must be a string (a substring of tensor names), got {flt!r}")
            value = cond["value"]
            if isinstance(value, (list, dict)) and not (isinstance(value, list) and all(_is_number(v) for v in value)):
                raise ConfigError(f"{w}: value must be a number or a list of numbers")
            out.append({"filter": flt, "value": check_setting(pname, value, f"{w}.value")})
        return out
    _check_range(pname, setting, where)
    return float(setting) if _is_number(setting) else setting


def evaluate_setting(setting, tensor_name: str, depth: float):
    """A setting's value for one tensor; depth in [0, 1] places the tensor in the layer stack.

    A list of numbers is a gradient: its entries are spread evenly from the first layer (depth 0) to
    the last (depth 1) and interpolated linearly in between. Conditions are tried in order; a filter
    matches when it is a substring of the tensor name; None when nothing matches.
    """
    if not isinstance(setting, list):
        return setting
    if setting and not isinstance(setting[0], dict):
        scaled = depth * (len(setting) - 1)
        i0 = min(int(scaled), len(setting) - 1)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        if cond["filter"] in (None, "*") or cond["filter"] in tensor_name:
            return evaluate_setting(cond["value"], tensor_name, depth)
    return None


def tensor_depth(name: str, num_layers: int | None, arch=GENERIC) -> float:
    """Where a tensor sits for gradients: layer i of n at i/(n-1); embeddings at 0; norm and head at 1."""
    split = split_layer_name(name, arch)
    if split is None or not num_layers:
        return 0.0 if "embed" in name else 1.0
    return split[0] / (num_layers - 1) if num_layers > 1 else 1.0


# --------------------------------------------------------------------------------------------------
# Block kernels (fp32) and the chunked driver shared by the pure functions and the streaming merge
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TensorRecipe:
    """How one output tensor is computed: the method and its parameters, resolved for that tensor.

    Inputs are ordered: linear -> the models; slerp -> [t=0 end, t=1 end]; task-vector methods ->
    [base, model 1, ...] (weights, densities and seeds are for the models, not the base).
    """

    method: str
    weights: list[float] = dataclasses.field(default_factory=list)
    t: float = 0.5
    densities: list[float] = dataclasses.field(default_factory=list)
    lam: float = 1.0
    normalize: bool = True
    rescale: bool = True
    seeds: list[int] = dataclasses.field(default_factory=list)
    eps: float = SLERP_EPS
    dot_threshold: float = SLERP_DOT_THRESHOLD

    def describe(self) -> str:
        def fmt(xs):
            return "[" + ", ".join(f"{x:g}" for x in xs) + "]"
        spec = METHODS[self.method]
        if self.method == "slerp":
            return f"slerp t={self.t:.4g}"
        parts = [self.method, f"w={fmt(self.weights)}"]
        if spec.trim:
            parts.append(f"density={fmt(self.densities)}")
        if spec.needs_base:
            parts.append(f"lambda={self.lam:g}")
        if self.normalize != spec.defaults.get("normalize"):
            parts.append(f"normalize={str(self.normalize).lower()}")
        if spec.trim == "random" and not self.rescale:
            parts.append("rescale=false")
        return " ".join(parts)


class Scratch:
    """Per-thread work buffers for the block kernels, reused block after block.

    Kernels write into these instead of allocating: a fresh allocation of a few MB is typically a
    fresh mmap that page-faults on first touch, which costs more than the arithmetic on it.
    """

    def __init__(self):
        self.bufs: dict = {}
        self.mapped: list = []  # (mmap, start, end) byte ranges the last block read viewed

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


def _affine_block(xs, weights, sc: Scratch):
    """sum_i c_i x_i with c = w / sum(w), as x_0 + sum_{i>0} c_i (x_i - x_0): identical inputs give back
    exactly x_0 (in any dtype), and the result never leaves the inputs' range by rounding."""
    total = sum(weights)
    x0 = sc.f32("x0", xs[0])
    if len(xs) == 1:
        return x0
    if len(xs) == 2:  # torch.lerp: x0 + c (x1 - x0) in one pass
        return x0.lerp_(sc.f32("tmp", xs[1]), weights[1] / total)
    acc = sc.f32("tmp", xs[1]).sub_(x0).mul_(weights[1] / total)
    for x, w in zip(xs[2:], weights[2:]):
        acc.add_(sc.f32("tmp2", x).sub_(x0), alpha=w / total)
    return x0.add_(acc)


def _weighted_sum_block(xs, coeffs, sc: Scratch):
    acc = sc.f32("x0", xs[0]).mul_(coeffs[0])
    for x, c in zip(xs[1:], coeffs[1:]):
        acc.add_(sc.f32("tmp", x), alpha=c)
    return acc


def slerp_coefficients(dot: float, sq0: float, sq1: float, t: float, eps: float = SLERP_EPS,
                       dot_threshold: float = SLERP_DOT_THRESHOLD) -> tuple[float, float, bool]:
    """(s0, s1, is_slerp) so that slerp(a, b, t) = s0 a + s1 b, from <a, b>, |a|^2 and |b|^2.

    Directions are normalised (a vector with norm <= eps is left as it is, as mergekit does); when the
    cosine's magnitude exceeds dot_threshold the tensors are nearly colinear and the result is lerp.
    """
    n0, n1 = math.sqrt(max(sq0, 0.0)), math.sqrt(max(sq1, 0.0))
    cos = dot / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if not math.isfinite(cos) or abs(cos) > dot_threshold:
        return 1.0 - t, t, False
    theta = math.acos(max(-1.0, min(1.0, cos)))
    sin_theta = math.sin(theta)
    return math.sin(theta - theta * t) / sin_theta, math.sin(theta * t) / sin_theta, True


def _slerp_stats(xs, sc: Scratch) -> tuple[float, float, float]:
    import torch

    a, b = sc.f32("x0", xs[0]), sc.f32("tmp", xs[1])
    return float(torch.dot(a, b)), float(torch.dot(a, a)), float(torch.dot(b, b))


def _delta_bits(x, base32, sc: Scratch, key: str = "bits"):
    """fp32 bit patterns of |x - base| (monotonic in the magnitude: radix-selectable)."""
    import torch

    return sc.f32(key, x).sub_(base32).abs_().view(torch.int32)


class _TopK:
    """Exact top-k of |delta| over a stream of blocks, with memory independent of the tensor size.

    Pass 1 histograms the high 16 bits of the fp32 magnitudes, pass 2 the low 16 bits inside the bin
    that holds the k-th largest (histograms add up, so blocks may be counted in any order); `keep`
    (pass 3) then keeps magnitudes above that threshold plus the first ones equal to it in flat
    order, so exactly k entries survive, as a stable sort would pick.
    """

    def __init__(self, numel: int, density: float):
        self.k = int(density * numel)
        self.mode = "all" if density >= 1 or self.k >= numel else "none" if self.k <= 0 else "select"

    def start(self, pass_no: int) -> None:
        import torch

        self.pass_no = pass_no
        self.hist = torch.zeros(1 << (15 if pass_no == 1 else 16), dtype=torch.int64)

    def histogram(self, bits, sc: Scratch):
        """This pass's histogram of one block (blocks are counted in parallel, then `add`ed)."""
        import torch

        high = torch.bitwise_right_shift(bits, 16, out=sc.get("high", bits.numel(), torch.int32))
        if self.pass_no == 1:
            return torch.bincount(high, minlength=1 << 15)
        sel = torch.eq(high, self.hi, out=sc.get("sel", bits.numel(), torch.bool))
        return torch.bincount(bits[sel].bitwise_and_(0xFFFF), minlength=1 << 16)

    def add(self, hist) -> None:
        self.hist += hist

    def finish(self) -> None:
        import torch

        rev = self.hist.flip(0).cumsum(0)
        if self.pass_no == 1:
            i = int(torch.searchsorted(rev, self.k))
            self.hi = (1 << 15) - 1 - i
            self.above = int(rev[i]) - int(self.hist[self.hi])
        else:
            j = int(torch.searchsorted(rev, self.k - self.above))
            lo = (1 << 16) - 1 - j
            greater = self.above + int(rev[j]) - int(self.hist[lo])
            self.threshold = (self.hi << 16) | lo
            self.need = self.k - greater
            del self.hist

    def count_equal(self, bits) -> int:
        return int((bits == self.threshold).sum())

    def keep(self, bits, seen_before: int, sc: Scratch):
        """Keep mask of one block, given how many threshold-equal entries precede it in flat order."""
        import torch

        gt = torch.gt(bits, self.threshold, out=sc.get("keep", bits.numel(), torch.bool))
        if seen_before >= self.need:
            return gt
        eq = bits == self.threshold
        rank = eq.cumsum(0) + seen_before
        return gt.logical_or_(eq.logical_and_(rank <= self.need))


def _derive_seed(*parts) -> int:
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def dare_keep_mask(seed: int, start: int, end: int, density: float, sc: Scratch | None = None):
    """The DARE keep mask (True with probability density) of flat elements [start, end) of a tensor.

    Element i's draw comes from block i // BLOCK, seeded by (seed, block), so the mask does not depend
    on how a caller chunks the tensor. [start, end) must lie in one block.
    """
    import torch

    sc = sc or Scratch()
    block = start // BLOCK
    if (end - 1) // BLOCK != block:
        raise ValueError("dare_keep_mask: range must lie within one block")
    g = torch.Generator().manual_seed(_derive_seed(seed, block))
    u = torch.rand(end - block * BLOCK, generator=g, out=sc.get("rand", end - block * BLOCK))
    return torch.lt(u[start - block * BLOCK:], density, out=sc.get("keep", end - start, torch.bool))


def _task_vector_block(recipe: TensorRecipe, xs, start: int, end: int, topks, seen_before, sc: Scratch):
    """base + lambda * mix of the (trimmed, weighted) task vectors for one block; xs = [base, models...]."""
    import torch

    spec = METHODS[recipe.method]
    base = sc.f32("base", xs[0])
    deltas = []
    for i, (x, w) in enumerate(zip(xs[1:], recipe.weights)):
        d = sc.f32(f"delta{i}", x).sub_(base)
        scale = 1.0
        if spec.trim == "magnitude" and topks[i].mode != "all":
            if topks[i].mode == "select":
                bits = torch.abs(d, out=sc.get("bits", d.numel())).view(torch.int32)
                d.mul_(topks[i].keep(bits, seen_before[i], sc))
            else:
                d.zero_()
        elif spec.trim == "random" and recipe.densities[i] < 1:
            d.mul_(dare_keep_mask(recipe.seeds[i], start, end, recipe.densities[i], sc))
            if recipe.rescale:
                scale = 1.0 / recipe.densities[i]
        if scale != 1.0:
            d.mul_(scale)
        deltas.append(d.mul_(w) if w != 1.0 else d)
    if spec.consensus:
        n = base.numel()
        total = sc.get("total", n).copy_(deltas[0])
        for d in deltas[1:]:
            total.add_(d)
        positive = torch.ge(total, 0, out=sc.get("positive", n, torch.bool))
        mixed = sc.get("mixed", n).zero_()
        divisor = sc.get("divisor", n).zero_() if recipe.normalize else None
        gt, lt = sc.get("gt", n, torch.bool), sc.get("lt", n, torch.bool)
        agree = sc.get("agree", n, torch.bool)
        agree_f = sc.get("agree_f", n)
        for d, w in zip(deltas, recipe.weights):
            torch.where(positive, torch.gt(d, 0, out=gt), torch.lt(d, 0, out=lt), out=agree)
            agree_f.copy_(agree)
            mixed.addcmul_(d, agree_f)
            if divisor is not None:
                divisor.add_(agree_f, alpha=w)
        if divisor is not None:
            divisor.masked_fill_(torch.eq(divisor, 0, out=gt), 1.0)
            mixed.div_(divisor)
    else:
        mixed = deltas[0]
        for d in deltas[1:]:
            mixed.add_(d)
        if recipe.normalize:
            mixed.div_(sum(recipe.weights))
    return base.add_(mixed, alpha=recipe.lam) if recipe.lam != 1.0 else base.add_(mixed)


def _serial_map(fn, items) -> list:
    return [fn(x) for x in items]


def _block_ranges(s: int, e: int) -> list[tuple[int, int]]:
    return [(a, min(e, a + BLOCK)) for a in range(s, e, BLOCK)]


def compute_chunks(recipe: TensorRecipe, read_block: Callable, numel: int, chunk: int, out_dtype, *,
                   map_fn: Callable = _serial_map, alloc: Callable | None = None,
                   scratch: Callable[[], Scratch] | None = None) -> Iterator:
    """Yield the merged tensor as flat chunks of `out_dtype`, `chunk` elements each (a multiple of BLOCK).

    `read_block(a, b, sc)` returns the inputs' flat elements [a, b) of one block (any float dtype) in
    the recipe's input order, valid until the same thread reads again. Blocks are computed by
    `map_fn(fn, items)` (a thread pool in the streaming merge), each thread reading its own blocks
    into its own `scratch()` buffers, so a block is read and computed while it is in the CPU's cache;
    every reduction adds per-block results in block order, so the bytes do not depend on the number
    of workers. `alloc(n, dtype)` gives the output chunk's buffer. Methods that need whole-tensor
    statistics read the inputs once (slerp) or twice (ties) more first.
    """
    import torch

    if chunk % BLOCK:
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
            yield from map_fn(run, _block_ranges(s, min(numel, s + chunk)))

    coeffs = None
    topks: list[_TopK] = []
    if recipe.method == "slerp":
        dot = sq0 = sq1 = 0.0
        for d, x, y in each_block(lambda a, b, xs, sc: _slerp_stats(xs, sc)):
            dot, sq0, sq1 = dot + d, sq0 + x, sq1 + y
        s0, s1, _ = slerp_coefficients(dot, sq0, sq1, recipe.t, recipe.eps, recipe.dot_threshold)
        coeffs = [s0, s1]
    elif spec.trim == "magnitude":
        topks = [_TopK(numel, d) for d in recipe.densities]
        selecting = [i for i, tk in enumerate(topks) if tk.mode == "select"]

        def hists(a, b, xs, sc):
            base = sc.f32("base", xs[0])
            return [topks[i].histogram(_delta_bits(xs[1 + i], base, sc), sc) for i in selecting]

        for pass_no in (1, 2) if selecting else ():
            for i in selecting:
                topks[i].start(pass_no)
            for hs in each_block(hists):
                for i, h in zip(selecting, hs):
                    topks[i].add(h)
            for i in selecting:
                topks[i].finish()
    lerp_weight = None  # two-model average: x0 + c (x1 - x0), what _affine_block computes
    if recipe.method == "linear" and recipe.normalize and len(recipe.weights) == 2:
        lerp_weight = recipe.weights[1] / sum(recipe.weights)
    seen = [0] * len(topks)  # ties: threshold-equal magnitudes met so far, per model
    for s in starts:
        e = min(numel, s + chunk)
        blocks = _block_ranges(s, e)
        out = alloc(e - s, out_dtype)
        offsets = [[tk.need if tk.mode == "select" else 0 for tk in topks] for _ in blocks]
        counting = [i for i, tk in enumerate(topks) if tk.mode == "select" and seen[i] < tk.need]
        if counting:
            def count_equal(r):
                sc = scratch()
                xs = read_block(r[0], r[1], sc)
                base = sc.f32("base", xs[0])
                return [topks[i].count_equal(_delta_bits(xs[1 + i], base, sc)) for i in counting]

            for j, counts in enumerate(map_fn(count_equal, blocks)):
                for i, c in zip(counting, counts):
                    offsets[j][i] = seen[i]
                    seen[i] += c

        def block(j: int, s=s, blocks=blocks, out=out, offsets=offsets) -> None:
            a, b = blocks[j]
            sc = scratch()
            xs = read_block(a, b, sc)
            if lerp_weight is not None and all(x.dtype == out_dtype for x in xs):
                # One pass: torch's lerp on bf16/fp16 computes in fp32 and rounds once, so this is the
                # fp32 result bit for bit (tests check it) at a quarter of the memory traffic.
                torch.lerp(xs[0], xs[1], lerp_weight, out=out[a - s:b - s])
                return
            if recipe.method == "linear":
                res = (_affine_block(xs, recipe.weights, sc) if recipe.normalize
                       else _weighted_sum_block(xs, recipe.weights, sc))
            elif recipe.method == "slerp":
                res = _weighted_sum_block(xs, coeffs, sc)
            else:
                res = _task_vector_block(recipe, xs, a, b, topks, offsets[j], sc)
            out[a - s:b - s].copy_(res)

        map_fn(block, range(len(blocks)))
        yield out


def _run_in_memory(recipe: TensorRecipe, tensors: list):
    import torch

    shape = tensors[0].shape
    for t in tensors[1:]:
        if t.shape != shape:
            raise ValueError(f"tensors must have the same shape, got {list(shape)} and {list(t.shape)}")
    flats = [t.detach().reshape(-1) for t in tensors]
    numel = flats[0].numel()
    chunk = max(BLOCK, -(-numel // BLOCK) * BLOCK)
    parts = list(compute_chunks(recipe, lambda a, b, sc: [f[a:b] for f in flats], numel, chunk, torch.float32))
    out = torch.cat(parts) if parts else torch.empty(0)
    return out.reshape(shape)


def _weights_for(n: int, weights) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} tensors")
    return weights


def _per_model(n: int, value, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    value = [float(v) for v in value]
    if len(value) != n:
        raise ValueError(f"{len(value)} {name} values for {n} tensors")
    return value


def linear(tensors: list, weights: list[float] | None = None, normalize: bool = True):
    """sum_i w_i x_i / sum_i w_i in fp32 (a plain weighted sum with normalize=False); equal weights by default."""
    weights = _weights_for(len(tensors), weights)
    if normalize and sum(weights) == 0:
        raise ValueError("weights sum to zero")
    return _run_in_memory(TensorRecipe("linear", weights=weights, normalize=normalize), list(tensors))


def slerp(a, b, t: float, eps: float = SLERP_EPS, dot_threshold: float = SLERP_DOT_THRESHOLD):
    """Spherical interpolation from a (t=0) to b (t=1) in fp32; lerp when they are nearly colinear."""
    return _run_in_memory(TensorRecipe("slerp", t=t, eps=eps, dot_threshold=dot_threshold), [a, b])


def task_arithmetic(base, tensors: list, weights: list[float] | None = None, lam: float = 1.0,
                    normalize: bool = False):
    """base + lam * sum_i w_i (x_i - base) (divided by sum_i w_i when normalize), in fp32."""
    weights = _weights_for(len(tensors), weights)
    recipe = TensorRecipe("task_arithmetic", weights=weights, lam=lam, normalize=normalize)
    return _run_in_memory(recipe, [base, *tensors])


def ties(base, tensors: list, weights: list[float] | None = None, density: float | list[float] = 1.0,
         lam: float = 1.0, normalize: bool = True):
    """TIES: keep each task vector's top int(density * numel) entries by magnitude, elect each entry's
    sign by the summed weighted deltas, and combine the agreeing ones (averaged by their weights when
    normalize); base + lam * that, in fp32."""
    n = len(tensors)
    recipe = TensorRecipe("ties", weights=_weights_for(n, weights), densities=_per_model(n, density, "density"),
                          lam=lam, normalize=normalize)
    return _run_in_memory(recipe, [base, *tensors])


def dare(base, tensors: list, weights: list[float] | None = None, density: float | list[float] = 1.0,
         lam: float = 1.0, *, seed: int = 0, name: str = "", ties: bool = False, normalize: bool | None = None,
         rescale: bool = True):
    """DARE: drop each task-vector entry with probability 1 - density (seeded by seed, the tensor name and
    the model's index, exactly as `upstack merge` draws it), rescale kept entries by 1/density, then
    combine linearly (dare_linear) or with TIES sign election (ties=True: dare_ties)."""
    method = "dare_ties" if ties else "dare_linear"
    n = len(tensors)
    if normalize is None:
        normalize = METHODS[method].defaults["normalize"]
    recipe = TensorRecipe(method, weights=_weights_for(n, weights), densities=_per_model(n, density, "density"),
                          lam=lam, normalize=normalize, rescale=rescale,
                          seeds=[dare_seed(seed, name, i) for i in range(n)])
    return _run_in_memory(recipe, [base, *tensors])


def dare_seed(seed: int, tensor_name: str, model_index: int) -> int:
    """The DARE seed of one model's task vector for one tensor (model_index counts the non-base models)."""
    return _derive_seed(seed, tensor_name, model_index)


# --------------------------------------------------------------------------------------------------
# Streaming: read chunks from checkpoint files, compute in a background thread
# --------------------------------------------------------------------------------------------------

def chunk_elements(out_dtype: str) -> int:
    """Elements per output chunk (whole blocks, about CHUNK_BYTES of output)."""
    return BLOCK * max(1, CHUNK_BYTES // (DTYPE_SIZES[out_dtype] * BLOCK))


def default_workers() -> int:
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not Linux
        return max(1, min(8, os.cpu_count() or 1))


class _Workspace:
    """What every tensor of one streaming merge shares (one tensor is computed at a time): a thread
    pool for the blocks of a chunk, each thread with its own scratch buffers, the inputs' memory
    maps, and a ring of output buffers handed to the writer and reused once written. Nothing is
    allocated per block or per chunk, so memory stays flat.
    """

    def __init__(self, workers: int):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="upstack-merge") if workers > 1 else None
        self.local = threading.local()
        self.out_bufs: list = [None] * (PREFETCH + 2)
        self.maps: dict = {}

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

    def block_reader(self, refs: list[TensorRef]) -> Callable:
        """read_block(a, b, sc): elements [a, b) of every input, for the calling thread.

        Inputs are memory-mapped: a block is a view of the page cache (no copy), and the pages a thread
        touched are unmapped again (MADV_DONTNEED) when it reads its next block, so the resident set
        stays at a few blocks per thread. Tensors whose offset does not suit their dtype, and pickled
        checkpoints, are read with pread into the thread's buffers instead.
        """
        import mmap

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

        def read_block(a: int, b: int, sc: Scratch) -> list:
            for mm, start, end in sc.mapped:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            sc.mapped.clear()
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
                    sc.mapped.append((maps[i], lo - lo % mmap.PAGESIZE,
                                      min(len(maps[i]), ref.offset + b * size + UNMAP_MARGIN)))
                else:
                    xs.append(self._pread(ref, a, b, sc.get(f"input{i}", (b - a) * size, torch.uint8)).view(dtypes[i]))
            return xs

        return read_block

    def _pread(self, ref: TensorRef, a: int, b: int, buf):
        size = DTYPE_SIZES[ref.dtype]
        view, done = memoryview(buf.numpy()), 0
        with open(ref.path, "rb", buffering=0) as f:
            while done < len(view):
                got = os.preadv(f.fileno(), [view[done:]], ref.offset + a * size + done)
                if got <= 0:
                    raise CheckpointError(f"{ref.path}: tensor {ref.name!r} is truncated")
                done += got
        return buf

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.local = threading.local()  # drops the threads' scratch buffers and views of the maps
        for mm in self.maps.values():
            try:
                mm.close()
            except BufferError:  # a caller still holds a view; the map goes when that does
                pass
        self.maps.clear()


@dataclasses.dataclass
class _Job:
    recipe: TensorRecipe
    refs: list[TensorRef]
    numel: int
    out_dtype: str


class _Pipeline:
    """Computes the merged tensors of one merge, in plan order, in one background thread that runs
    ahead of the writer across tensor boundaries (so slerp's and ties' statistics passes for the
    next tensor overlap the writing of this one).

    The producer takes an output buffer from the ring, fills it with a chunk and queues it; the
    writer's `stream(j)` yields the chunks of job j, and each buffer returns to the ring when the
    writer asks for the next chunk (by then it has been written: the writer never keeps a chunk).
    Jobs must be streamed in order; asking for any other job restarts the producer there.
    """

    def __init__(self, ws: _Workspace):
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
                for out in compute_chunks(job.recipe, ws.block_reader(job.refs), job.numel,
                                          chunk_elements(job.out_dtype), dt, map_fn=map_fn, alloc=alloc,
                                          scratch=ws.scratch):
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
        from upstack.checkpoint import tensor_to_bytes

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


def _tensor_plan(pipe: _Pipeline, name: str, shape: tuple, out_dtype: str, recipe: TensorRecipe,
                 refs: list[TensorRef], description: str) -> TensorPlan:
    j = pipe.add(_Job(recipe, refs, math.prod(shape), out_dtype))
    return TensorPlan(name, out_dtype, tuple(shape), description=description, compute=lambda: pipe.stream(j))


# --------------------------------------------------------------------------------------------------
# Checking the models against each other
# --------------------------------------------------------------------------------------------------

def _embed_name(ckpt: Checkpoint) -> str | None:
    names = [n for n in ckpt.tensors if n.endswith(EMBED_SUFFIX)]
    return names[0] if names else None


def is_tied(ckpt: Checkpoint) -> bool:
    """The output head is the input embedding: tie_word_embeddings is true, or no lm_head is stored
    (transformers then ties it too)."""
    return ckpt.config.get("tie_word_embeddings") is True or LM_HEAD not in ckpt.tensors


def _label(path: str, labels: dict[str, str]) -> str:
    return labels.get(path, path)


def _check_compatible(ref: Checkpoint, ref_label: str, other: Checkpoint, other_label: str) -> None:
    a, b = ref.config, other.config
    if a.get("model_type") != b.get("model_type") or (a.get("architectures") and b.get("architectures")
                                                      and a.get("architectures") != b.get("architectures")):
        raise UpstackError(
            f"models have different architectures: {ref_label} is {a.get('model_type')} {a.get('architectures')}, "
            f"{other_label} is {b.get('model_type')} {b.get('architectures')}; only variants of one model can be merged")
    ea, eb = _embed_name(ref), _embed_name(other)
    va = ref.tensors[ea].shape[0] if ea else a.get("vocab_size")
    vb = other.tensors[eb].shape[0] if eb else b.get("vocab_size")
    if va != vb or (a.get("vocab_size") is not None and b.get("vocab_size") is not None
                    and a.get("vocab_size") != b.get("vocab_size")):
        raise UpstackError(
            f"vocabularies differ: {ref_label} has {va} tokens (vocab_size {a.get('vocab_size')}), {other_label} has "
            f"{vb} (vocab_size {b.get('vocab_size')}); upstack does not resize embeddings: merge models that share "
            "one tokenizer")
    _check_same_tokens(ref.folder, ref_label, other.folder, other_label)
    ta = {n: r for n, r in ref.tensors.items() if n != LM_HEAD}
    tb = {n: r for n, r in other.tensors.items() if n != LM_HEAD}
    hint = ""
    if a.get("num_hidden_layers") != b.get("num_hidden_layers"):
        hint = f" ({ref_label} has {a.get('num_hidden_layers')} layers, {other_label} {b.get('num_hidden_layers')})"
    for name, r in ta.items():
        if name not in tb:
            raise UpstackError(f"models differ at tensor {name!r}: {ref_label} has it, {other_label} does not{hint}")
        if tuple(tb[name].shape) != tuple(r.shape):
            raise UpstackError(f"models differ at tensor {name!r}: shape {list(r.shape)} in {ref_label}, "
                               f"{list(tb[name].shape)} in {other_label}")
    for name in tb:
        if name not in ta:
            raise UpstackError(f"models differ at tensor {name!r}: {other_label} has it, {ref_label} does not{hint}")
    tied_a, tied_b = is_tied(ref), is_tied(other)
    if tied_a != tied_b and not (ea and eb):
        raise UpstackError(f"{ref_label if not ea else other_label}: no *{EMBED_SUFFIX} tensor to stand in for the "
                           "missing lm_head")
    if not (tied_a and tied_b):
        head_a = ref.tensors[ea if tied_a else LM_HEAD]
        head_b = other.tensors[eb if tied_b else LM_HEAD]
        if tuple(head_a.shape) != tuple(head_b.shape):
            raise UpstackError(f"models differ at tensor {LM_HEAD!r} (the embedding where tied): shape "
                               f"{list(head_a.shape)} in {ref_label}, {list(head_b.shape)} in {other_label}")


def _token_table(folder: Path):
    p = folder / "tokenizer.json"
    if not p.is_file():
        return None
    try:
        tok = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # unigram: [[piece, score], ...]
        vocab = {v[0]: i for i, v in enumerate(vocab) if isinstance(v, list) and v}
    if not isinstance(vocab, dict):
        return None
    table = dict(vocab)
    for t in tok.get("added_tokens") or []:
        if isinstance(t, dict) and "content" in t and "id" in t:
            table[t["content"]] = t["id"]
    return table


def _check_same_tokens(fa: Path, la: str, fb: Path, lb: str) -> None:
    """Same vocab size is not enough: refuse tokenizers that map the same ids to different tokens."""
    ta, tb = _token_table(fa), _token_table(fb)
    if ta is None or tb is None or ta == tb:
        return
    ids_a = {i: tok for tok, i in ta.items()}
    ids_b = {i: tok for tok, i in tb.items()}
    for i in sorted(set(ids_a) | set(ids_b)):
        if ids_a.get(i) != ids_b.get(i):
            raise UpstackError(f"vocabularies differ: token id {i} is {ids_a.get(i)!r} in {la}'s tokenizer.json but "
                               f"{ids_b.get(i)!r} in {lb}'s; merged embedding rows would mix unrelated tokens")


# --------------------------------------------------------------------------------------------------
# The merge stage
# --------------------------------------------------------------------------------------------------

def _canonical_method(method: str) -> str:
    m = ALIASES.get(method, method)
    if m not in METHODS:
        choices = ", ".join([*METHODS, *ALIASES])
        raise ConfigError(f"unknown merge method {method!r} (choose from {choices})")
    return m


def validate_config(cfg: MergeConfig) -> tuple[str, dict, list[dict]]:
    """Check method, models and parameters before any file is opened.

    Returns (method, global settings, per-model settings) in canonical form.
    """
    method = _canonical_method(cfg.method)
    spec = METHODS[method]
    allowed = set(spec.defaults)
    if not cfg.models:
        raise ConfigError("no models to merge (give at least two checkpoint folders)")
    glob = {}
    for pname, setting in (cfg.parameters or {}).items():
        if pname not in allowed:
            raise ConfigError(f"parameter {pname!r} is not used by method {method} "
                              f"(it takes: {', '.join(sorted(allowed))})")
        glob[pname] = check_setting(pname, setting, f"parameters.{pname}")
    per_model = []
    for i, entry in enumerate(cfg.models):
        where = f"models[{i}] ({entry.model})"
        params = dict(entry.parameters or {})
        if entry.weight is not None:
            if "weight" in params:
                raise ConfigError(f"{where}: weight is given twice (weight and parameters.weight)")
            params["weight"] = entry.weight
        settings = {}
        for pname, setting in params.items():
            if pname not in spec.per_model:
                what = (f"it takes {', '.join(spec.per_model)} per model" if spec.per_model
                        else "it takes no per-model parameters")
                raise ConfigError(f"{where}: parameter {pname!r} is not a per-model parameter of {method} ({what})")
            settings[pname] = check_setting(pname, setting, f"{where}.parameters.{pname}")
        per_model.append(settings)
    for pname, default in spec.defaults.items():
        if default is REQUIRED and pname not in glob:
            raise ConfigError(f"method {method} needs parameter {pname} (e.g. --{pname} 0.5)")
    if spec.needs_base and not cfg.base:
        raise ConfigError(f"method {method} needs a base model (--base MODEL, or base: in the config): "
                          "task vectors are differences from it")
    if cfg.seed is None or type(cfg.seed) is not int:
        raise ConfigError(f"seed must be an integer, got {cfg.seed!r}")
    if cfg.workers is not None and (type(cfg.workers) is not int or cfg.workers < 1):
        raise ConfigError(f"workers must be a positive integer, got {cfg.workers!r}")
    return method, glob, per_model


def _resolve(pname: str, settings: list[dict], tensor: str, depth: float, default):
    for s in settings:
        if pname in s:
            v = evaluate_setting(s[pname], tensor, depth)
            if v is not None:
                return v
    if default is REQUIRED:
        raise ConfigError(f"parameter {pname} has no value for tensor {tensor!r} (no filter matches it and "
                          "there is no default entry without a filter)")
    return default


def merge(cfg: MergeConfig) -> dict:
    """Run `upstack merge`: check, plan every output tensor, then (unless dry_run) stream the checkpoint."""
    method, glob, per_model = validate_config(cfg)
    spec = METHODS[method]
    if not cfg.out and not cfg.dry_run:
        raise ConfigError("no output folder (--out DIR, or out: in the config)")
    out = Path(cfg.out) if cfg.out else None
    if out is not None and not cfg.dry_run:
        check_output_free(out, cfg.overwrite)
    shard_size = parse_bytes(cfg.shard_size, "--shard-size")
    out_dtype = normalize_dtype(cfg.dtype) if cfg.dtype else None
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype}: merged tensors must be a float type (float32, bfloat16, float16)")

    model_paths = [e.model for e in cfg.models]
    key = lambda p: os.path.realpath(p)  # noqa: E731
    if out is not None and any(key(p) == key(out) for p in [*model_paths, cfg.base or ""] if p):
        raise ConfigError(f"--out {out} is one of the input models; write the merge to a new folder")
    # Roles: which checkpoints are merged, in what order, and with which per-model settings.
    base_path = cfg.base
    if method == "slerp":
        order = list(range(len(model_paths)))
        if base_path is not None:
            hits = [i for i, p in enumerate(model_paths) if key(p) == key(base_path)]
            if hits:
                order = [hits[0]] + [i for i in order if i != hits[0]]
                inputs = [model_paths[i] for i in order]
                settings = [per_model[i] for i in order]
            else:
                inputs, settings = [base_path, *model_paths], [{}, *per_model]
        else:
            inputs, settings = model_paths, per_model
        if len(inputs) != 2:
            raise ConfigError(f"slerp interpolates exactly two models, got {len(inputs)} "
                              "(the base, if given, is the t=0 end)")
    elif spec.needs_base:
        keep = [i for i, p in enumerate(model_paths) if key(p) != key(base_path)]
        inputs = [model_paths[i] for i in keep]
        settings = [per_model[i] for i in keep]
        if not inputs:
            raise ConfigError(f"{method} needs at least one model besides the base")
    else:
        inputs, settings = model_paths, per_model
        if len(inputs) < 2:
            raise ConfigError(f"{method} needs at least two models, got {len(inputs)}")
    ref_path = base_path if base_path is not None else inputs[0]

    # Open and check every checkpoint once.
    labels: dict[str, str] = {}
    ckpts: dict[str, Checkpoint] = {}
    for p in dict.fromkeys([ref_path, *inputs]):
        if key(p) not in ckpts:
            ckpts[key(p)] = open_checkpoint(p, allow_pickle=cfg.allow_pickle)
            labels[key(p)] = str(p)
    ref = ckpts[key(ref_path)]
    for k, ck in ckpts.items():
        if k != key(ref_path):
            _check_compatible(ref, labels[key(ref_path)], ck, labels[k])
    in_ckpts = [ckpts[key(p)] for p in inputs]
    base_ckpt = ckpts[key(base_path)] if spec.needs_base else None
    arch = get_arch(ref.config, allow_unknown=True)
    n_layers = ref.config.get(arch.layer_count_key)
    n_layers = n_layers if type(n_layers) is int else None

    # Tied embeddings: a model without its own head uses its embedding; the output ties only if all do.
    merged_ckpts = [*in_ckpts, *([base_ckpt] if base_ckpt is not None else [])]
    tied_out = all(is_tied(c) for c in merged_ckpts)
    embed = _embed_name(ref)

    def source(ck: Checkpoint, name: str) -> TensorRef:
        if name == LM_HEAD and is_tied(ck):
            return ck.tensors[_embed_name(ck)]
        return ck.tensors[name]

    names = [r.name for r in sorted(ref.tensors.values(), key=lambda r: (str(r.path), r.offset))
             if r.name != LM_HEAD]
    if not tied_out:
        if LM_HEAD in ref.tensors and not is_tied(ref):
            pos = [r.name for r in sorted(ref.tensors.values(), key=lambda r: (str(r.path), r.offset))].index(LM_HEAD)
            names.insert(pos, LM_HEAD)
        else:
            names.append(LM_HEAD)

    ws = _Workspace(default_workers() if cfg.workers is None else cfg.workers)
    pipe = _Pipeline(ws)
    plans: list[TensorPlan] = []
    rows: list[dict] = []
    notes: list[str] = []
    dtype_mix = set()
    for name in names:
        refs_in = [source(c, name) for c in in_ckpts]
        base_ref = source(base_ckpt, name) if base_ckpt is not None else None
        ref_tensor = source(ref, name)
        shape = tuple(ref_tensor.shape)
        all_refs = ([base_ref] if base_ref is not None else []) + refs_in
        if any(r.dtype not in FLOAT_DTYPES for r in all_refs):
            plans.append(TensorPlan(name, ref_tensor.dtype, shape, copy=ref_tensor,
                                    description=f"copy from {labels[key(ref_path)]} ({ref_tensor.dtype}: not merged)"))
            rows.append({"name": name, "shape": list(shape), "dtype": ref_tensor.dtype, "method": "copy", "params": {}})
            notes.append(f"{name}: {ref_tensor.dtype} tensor copied from {labels[key(ref_path)]}, not merged")
            continue
        if len({r.dtype for r in all_refs}) > 1:
            dtype_mix.add(name)
        depth = tensor_depth(name, n_layers, arch)
        recipe = _recipe_for(method, spec, name, depth, glob, settings, cfg.seed)
        t_dtype = out_dtype or ref_tensor.dtype
        desc = recipe.describe()
        if name == LM_HEAD and any(is_tied(c) for c in merged_ckpts):
            desc += " (tied models contribute their embedding)"
        plans.append(_tensor_plan(pipe, name, shape, t_dtype, recipe, all_refs, desc))
        rows.append({"name": name, "shape": list(shape), "dtype": t_dtype, "method": method,
                     "params": _recipe_params(recipe, spec)})
    if dtype_mix:
        notes.append(f"{len(dtype_mix)} tensor(s) have different dtypes across models; computed in fp32, "
                     f"written as {'--dtype ' + out_dtype if out_dtype else 'in the base/first model dtype'}")

    new_config = dict(ref.config)
    new_config["tie_word_embeddings"] = tied_out
    if out_dtype:
        for k in ("dtype", "torch_dtype"):
            if k in new_config or k == "dtype":
                new_config[k] = TORCH_DTYPE_NAMES[out_dtype]
    if not tied_out and any(is_tied(c) for c in merged_ckpts):
        notes.append(f"some models tie lm_head to {embed}: their embedding stands in for lm_head, and the "
                     "output stores its own lm_head (tie_word_embeddings: false)")
    resolved = resolved_config(cfg, method)
    report = {
        "method": method, "models": [str(p) for p in inputs], "base": str(base_path) if base_path else None,
        "reference": str(ref_path), "out": str(out) if out else None, "parameters": resolved["parameters"],
        "model_parameters": [s for s in settings], "seed": cfg.seed,
        "output_dtype": ", ".join(sorted({p.dtype for p in plans})),
        "tie_word_embeddings": tied_out, "num_tensors": len(plans),
        "num_parameters": sum(p.numel for p in plans), "output_bytes": sum(p.nbytes for p in plans),
        "num_shards": len(assign_shards(plans, shard_size)), "groups": summarize_groups(rows),
        "tensors": [dict(r, description=p.description) for r, p in zip(rows, plans)],
        "notes": notes, "dry_run": cfg.dry_run,
    }
    if cfg.dry_run:
        ws.close()
        return report
    provenance = {"merge": {**resolved, "upstack_version": __version__}}
    import torch

    # Blocks run in our own worker threads, one torch thread each: torch's intra-op pool would put a
    # barrier after every small op, and on a busy machine each barrier waits for a descheduled thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        write_checkpoint(
            plans, out, config=new_config, aux_from=ref.folder, shard_size=shard_size, overwrite=cfg.overwrite,
            model_card=model_card(cfg, method, resolved, report),
            extra_files={"upstack.json": json.dumps(provenance, indent=2) + "\n"},
            metadata={"upstack_merge": method}, progress=not cfg.quiet,
        )
    finally:
        pipe.stop()
        torch.set_num_threads(threads)
        ws.close()
    return report


def _recipe_for(method: str, spec: MethodSpec, name: str, depth: float, glob: dict, settings: list[dict],
                seed: int) -> TensorRecipe:
    def g(pname):
        return _resolve(pname, [glob], name, depth, spec.defaults[pname])

    def m(pname, i):
        return _resolve(pname, [settings[i], glob], name, depth, spec.defaults[pname])

    if method == "slerp":
        t = g("t")
        _check_range("t", t, f"tensor {name!r}")
        return TensorRecipe("slerp", t=float(t))
    n = len(settings)
    weights = [float(m("weight", i)) for i in range(n)]
    normalize = bool(g("normalize"))
    recipe = TensorRecipe(method, weights=weights, normalize=normalize)
    if normalize and not spec.consensus and sum(weights) == 0:
        raise ConfigError(f"weights sum to zero for tensor {name!r} ({weights}): a weighted average "
                          "divides by their sum (use normalize: false for a plain sum)")
    if spec.needs_base:
        recipe.lam = float(g("lambda"))
    if spec.trim:
        recipe.densities = [float(m("density", i)) for i in range(n)]
        for d in recipe.densities:
            _check_range("density", d, f"tensor {name!r}")
    if spec.trim == "random":
        recipe.rescale = bool(g("rescale"))
        recipe.seeds = [dare_seed(seed, name, i) for i in range(n)]
    return recipe


def _recipe_params(recipe: TensorRecipe, spec: MethodSpec) -> dict:
    if recipe.method == "slerp":
        return {"t": recipe.t}
    params: dict = {"weight": recipe.weights}
    if spec.trim:
        params["density"] = recipe.densities
    if spec.needs_base:
        params["lambda"] = recipe.lam
    params["normalize"] = recipe.normalize
    return params


def tensor_group(name: str) -> str:
    """'model.layers.7.mlp.up_proj.weight' -> 'model.layers.*.mlp.up_proj.weight'."""
    return re.sub(r"\.\d+\.", ".*.", name, count=1)


def summarize_groups(rows: list[dict]) -> list[dict]:
    """Tensors grouped by name pattern; a parameter that varies within a group is shown as its
    {"min", "max"} (element-wise for per-model lists)."""
    groups: dict[str, dict] = {}
    for r in rows:
        g = groups.setdefault(tensor_group(r["name"]), {"group": tensor_group(r["name"]), "tensors": 0,
                                                         "method": r["method"], "params": {}})
        g["tensors"] += 1
        for k, v in r["params"].items():
            if k not in g["params"]:
                g["params"][k] = {"min": v, "max": v}
                continue
            cur = g["params"][k]
            if isinstance(v, list):
                cur["min"] = [min(a, b) for a, b in zip(cur["min"], v)]
                cur["max"] = [max(a, b) for a, b in zip(cur["max"], v)]
            else:
                cur["min"], cur["max"] = min(cur["min"], v), max(cur["max"], v)
    for g in groups.values():
        g["params"] = {k: (v["min"] if v["min"] == v["max"] else v) for k, v in g["params"].items()}
    return list(groups.values())


def format_param(value) -> str:
    """0.5 -> '0.5'; [0.4, 0.6] -> '[0.4, 0.6]'; {"min": 0, "max": 1} -> '0..1'."""
    if isinstance(value, dict):
        return f"{format_param(value['min'])}..{format_param(value['max'])}"
    if isinstance(value, list):
        return "[" + ", ".join(format_param(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def resolved_config(cfg: MergeConfig, method: str) -> dict:
    """The merge as a config mapping (what the model card and upstack.json record; re-runnable)."""
    models = []
    for e in cfg.models:
        entry: dict = {"model": str(e.model)}
        params = dict(e.parameters or {})
        if e.weight is not None:
            params["weight"] = e.weight
        if params:
            entry["parameters"] = params
        models.append(entry)
    out = {"models": models, "method": method}
    if cfg.base:
        out["base"] = str(cfg.base)
    out["parameters"] = dict(cfg.parameters or {})
    if cfg.dtype:
        out["dtype"] = cfg.dtype
    if METHODS[method].trim == "random":
        out["seed"] = cfg.seed
    return out


def model_card(cfg: MergeConfig, method: str, resolved: dict, report: dict) -> str:
    import yaml

    names = [Path(e.model).name for e in cfg.models]
    lines = [
        "---",
        "base_model:",
        *[f"- {n}" for n in names],
        "tags:", "- upstack", "- merge",
        "---", "",
        f"# {Path(cfg.out).name}", "",
        f"Made by upstack {__version__} by merging {len(cfg.models)} models with **{method}** "
        f"({METHODS[method].doc}).", "",
        "## Models", "",
        *[f"- `{e.model}`" for e in cfg.models],
    ]
    if cfg.base:
        lines += ["", f"Base model: `{cfg.base}`."]
    lines += ["", "## Parameters", "", "| tensors | count | parameters |", "|---|---|---|"]
    for g in report["groups"]:
        params = ", ".join(f"{k}={format_param(v)}" for k, v in g["params"].items())
        lines.append(f"| `{g['group']}` | {g['tensors']} | {params} |")
    lines += ["", f"Tied embeddings: {str(report['tie_word_embeddings']).lower()}. "
                  "Tokenizer, chat template and generation config come from "
                  f"`{report['reference']}`.", "",
              "## Configuration", "", "```yaml", yaml.safe_dump(resolved, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
