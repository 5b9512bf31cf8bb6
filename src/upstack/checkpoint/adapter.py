"""Merging a PEFT LoRA adapter into a base checkpoint, tensor by tensor, as a plan for the streaming writer.

A LoRA adapter stores, for each adapted linear module M, two small matrices A (r x in) and B (out x r);
the merged weight is W + s * B @ A with s = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA, per-module
r and alpha from rank_pattern / alpha_pattern). DoRA adds a magnitude vector m and rescales each output
row: W' = m / ||W + s B A||_row * (W + s B A). Modules saved whole (`modules_to_save`, trained biases)
replace the base tensor. Every other tensor is a byte-range copy of the base.

As in PEFT, the config's r (or its rank_pattern) must be the tensors' rank, and `fan_in_fan_out` follows
the module's type, not the config: nn.Linear stores W as (out, in) and PEFT ignores the flag for it; the
Conv1D of GPT-2-style models stores (in, out) and PEFT sets the flag for it. Module names are checked
against the base before any rank/alpha pattern is matched (adapter_config: bounded matching).

Unlike PEFT's `merge_and_unload`, which needs the whole model in memory, each merged tensor is computed
in row chunks in fp32 and written in the base's dtype, so memory stays bounded by a chunk of the largest
tensor. The adapter itself (small) is read through the same strict safetensors reader as checkpoints.
"""

from __future__ import annotations

import queue
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from upstack.checkpoint.adapter_config import (
    ADAPTER_CONFIG,
    ADAPTER_PICKLE,
    ADAPTER_WEIGHTS,
    PatternMatcher,
    module_scale,
    read_lora_config,
)
from upstack.arch import embed_name, get_arch, tied
from upstack.checkpoint.dtypes import TORCH_DTYPE_NAMES
from upstack.checkpoint.finite import NONFINITE_FLAG, all_finite, nonfinite_error
from upstack.checkpoint.reader import (
    Checkpoint,
    TensorRef,
    checked_file,
    load_tensor,
    read_safetensors_header,
    tensor_to_bytes,
)
from upstack.checkpoint.writer import TensorPlan, source_plan
from upstack.errors import CheckpointError

# Model types whose adapted projections are transformers' Conv1D (weights stored in x out; their lm_head
# is an nn.Linear): PEFT merges these with fan_in_fan_out whatever the config says.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
PEFT_PREFIX = "base_model.model."
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
CHUNK_BYTES = 4 << 20   # output bytes handed to the writer at once (whole rows)
BLOCK_ELEMS = 1 << 20   # fp32 elements computed at once: W + s B A and the cast stay in the CPU's cache
AHEAD = 1               # chunks computed ahead of the writer, in a background thread


@contextmanager
def merge_threads():
    """While a merge is written: torch computes in all cores but one, which is left to the writer (its
    copies into the page cache). With every core, OpenMP's workers spin between the many small per-block
    operations and take the writer's core: the 4 GB bench took 6.3-6.7 s that way, 3.8-4.2 s with this."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(max(1, prev - 1))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


class _Buffers:
    """Buffers shared by every merged tensor of one plan (the writer consumes the plans one at a time):
    allocated once at the largest size needed, not once per tensor, which would fault in and zero fresh
    pages for each of them (measured: most of the merge's time was the kernel doing that)."""

    def __init__(self):
        self._bufs: dict = {}

    def get(self, key, nbytes: int):
        import torch

        buf = self._bufs.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = self._bufs[key] = torch.empty(nbytes, dtype=torch.uint8)
        return buf


def ahead(chunks, depth: int = AHEAD):
    """Iterate `chunks` in a background thread, `depth` items ahead of the consumer (torch and file reads
    release the GIL, so computing the next chunk overlaps writing this one). Errors are re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def run():
        try:
            for item in chunks:
                if stop.is_set():
                    return
                q.put(item)
        except BaseException as e:  # handed to the consumer
            q.put(e)
            return
        q.put(done)

    thread = threading.Thread(target=run, name="adapter-merge", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


@dataclass
class LoraModule:
    """One adapted linear module: its A, B (and DoRA magnitude) tensors in the adapter file."""

    module: str                      # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    a: TensorRef | None = None
    b: TensorRef | None = None
    magnitude: TensorRef | None = None
    scale: float = 0.0
    transposed: bool = False         # the base stores W as (in, out): a Conv1D module (fan_in_fan_out)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Adapter:
    folder: Path
    config: dict
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replaced: dict[str, TensorRef] = field(default_factory=dict)  # base tensor name -> adapter tensor
    rank_patterns: list = field(default_factory=list)   # [(key, rank, matcher)] (adapter_config)
    alpha_patterns: list = field(default_factory=list)  # [(key, alpha, matcher)]


def open_adapter(folder: str | Path) -> Adapter:
    """Read and check an adapter folder: config (adapter_config.read_lora_config), then the strict header of
    its safetensors file and the shapes of its LoRA pairs. Ranks and scales are resolved against the base
    (plan_adapter_merge)."""
    folder = Path(folder)
    cfg, rank_patterns, alpha_patterns = read_lora_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.exists():
        if (folder / ADAPTER_PICKLE).exists():
            raise CheckpointError(f"{folder}: the adapter is a pickled {ADAPTER_PICKLE}, which can run code when "
                                  "loaded; convert it to safetensors first")
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS}")
    checked_file(folder, weights)
    adapter = Adapter(folder, cfg, rank_patterns=rank_patterns, alpha_patterns=alpha_patterns)
    for name, ref in read_safetensors_header(weights).items():
        if not name.startswith(PEFT_PREFIX):
            raise CheckpointError(f"{weights}: tensor {name!r} is not under {PEFT_PREFIX!r} (not a PEFT LoRA file)")
        rest = name[len(PEFT_PREFIX):]
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)(?:\.[\w-]+)?\.weight", rest) or \
            re.fullmatch(r"(.+)\.(lora_magnitude_vector)(?:\.[\w-]+)?(?:\.weight)?", rest)
        if m is None:
            if ".lora_" in rest:
                raise CheckpointError(f"{weights}: tensor {name!r} is a LoRA part upstack cannot merge "
                                      "(only linear lora_A/lora_B and DoRA magnitudes)")
            adapter.replaced[rest] = ref  # a module saved whole (modules_to_save) or a trained bias
            continue
        mod = adapter.modules.setdefault(m.group(1), LoraModule(m.group(1)))
        setattr(mod, {"lora_A": "a", "lora_B": "b", "lora_magnitude_vector": "magnitude"}[m.group(2)], ref)
    for mod in adapter.modules.values():
        if mod.a is None or mod.b is None:
            raise CheckpointError(f"{weights}: module {mod.module} has only one of lora_A / lora_B")
        if len(mod.a.shape) != 2 or len(mod.b.shape) != 2 or mod.b.shape[1] != mod.a.shape[0]:
            raise CheckpointError(f"{weights}: module {mod.module}: lora_A {list(mod.a.shape)} and lora_B "
                                  f"{list(mod.b.shape)} do not form a rank-{mod.a.shape[0]} product")
        if mod.rank == 0:
            raise CheckpointError(f"{weights}: module {mod.module}: lora_A {list(mod.a.shape)} has rank 0")
    if not adapter.modules and not adapter.replaced:
        raise CheckpointError(f"{weights}: the adapter holds no tensors")
    return adapter


def _weight_shape(mod: LoraModule) -> tuple[int, int]:
    out_f, in_f = mod.b.shape[0], mod.a.shape[1]
    return (in_f, out_f) if mod.transposed else (out_f, in_f)


def stored_transposed(base_config: dict, module: str) -> bool:
    """Whether the base stores `module`'s weight as (in, out): a Conv1D (PEFT then merges with fan_in_fan_out
    True, and with False for an nn.Linear, whatever the adapter's config says)."""
    return base_config.get("model_type") in CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] != "lm_head"


def check_adapter_matches(adapter: Adapter, base: Checkpoint, base_label: str) -> None:
    """Every adapted module and replaced tensor must exist in the base with the adapter's shapes."""
    problems = []
    for mod in adapter.modules.values():
        mod.transposed = stored_transposed(base.config, mod.module)
        ref = base.tensors.get(f"{mod.module}.weight")
        want = _weight_shape(mod)
        if ref is None:
            problems.append(f"module {mod.module} has no weight in {base_label}")
        elif tuple(ref.shape) != want:
            problems.append(f"{mod.module}.weight is {list(ref.shape)} in {base_label}, the adapter expects "
                            f"{list(want)}")
        elif ref.dtype not in FLOAT_DTYPES:
            problems.append(f"{mod.module}.weight is stored as {ref.dtype} in {base_label}, not a float dtype "
                            "(merge into the unquantized base)")
        if mod.magnitude is not None and mod.magnitude.numel != mod.b.shape[0]:
            problems.append(f"module {mod.module}: DoRA magnitude has {mod.magnitude.numel} entries for "
                            f"{mod.b.shape[0]} output rows")
    problems += _tie_problems(adapter, base, base_label)
    head_copy = _tied_head_copy(adapter, base)
    for name, ref in adapter.replaced.items():
        target = base.tensors.get(name)
        if name == head_copy:
            continue
        if target is None:
            problems.append(f"tensor {name} (saved whole in the adapter) is not in {base_label}")
        elif tuple(target.shape) != tuple(ref.shape):
            problems.append(f"tensor {name} is {list(target.shape)} in {base_label}, the adapter's is "
                            f"{list(ref.shape)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"adapter {adapter.folder} does not fit base {base_label}: "
                              + "; ".join(problems[:3]) + more + " (was it trained on another base model?)")


def resolve_ranks_and_scales(adapter: Adapter) -> None:
    """Each module's rank and alpha as PEFT picks them (rank_pattern / alpha_pattern, else r / lora_alpha),
    for modules already checked against the base: a rank unlike the tensors' is refused as PEFT refuses it
    (its load fails with a size mismatch); the scale must be a float32 number."""
    cfg, path = adapter.config, adapter.folder / ADAPTER_CONFIG
    match = PatternMatcher(path)
    for mod in adapter.modules.values():
        r, pat = match.value(adapter.rank_patterns, mod.module, cfg["r"], "rank_pattern")
        if r != mod.rank:
            says = f"rank_pattern {pat!r} gives" if pat is not None else "the config gives"
            raise CheckpointError(f"{adapter.folder / ADAPTER_WEIGHTS}: module {mod.module} has rank {mod.rank} "
                                  f"(lora_A {list(mod.a.shape)}) but {says} r={r} in {path.name} (PEFT refuses "
                                  "such an adapter: set r / rank_pattern to the saved rank)")
        alpha, _ = match.value(adapter.alpha_patterns, mod.module, cfg["lora_alpha"], "alpha_pattern")
        mod.scale = module_scale(cfg, r, alpha, path, mod.module)


def check_replaced_finite(adapter: Adapter) -> None:
    """Tensors the adapter saves whole are written as they are: refuse NaN or inf in them, as in every input
    the merge computes from."""
    for name, ref in adapter.replaced.items():
        if not all_finite(load_tensor(ref)):
            raise CheckpointError(
                f"{adapter.folder / ADAPTER_WEIGHTS}: tensor {ref.name!r} (saved whole: it replaces {name}) has "
                f"non-finite values (NaN or inf); check the adapter, or pass {NONFINITE_FLAG} to write it anyway")


def _tied_names(base: Checkpoint) -> tuple[str, str] | None:
    """(embedding, head) tensor names of a base whose head is its embedding (tied), else None."""
    arch = get_arch(base.config, allow_unknown=True)
    emb = embed_name(base.tensors, arch)
    if emb is None or not tied(base.config, base.tensors, arch):
        return None
    return emb, arch.head_name


def _trained_together(adapter: Adapter, names: tuple[str, str]) -> bool:
    """The adapter saved the tied embedding and head as one trained matrix (PEFT's modules_to_save with
    ensure_weight_tying saves it under both names)."""
    emb, head = names
    return emb in adapter.replaced and head in adapter.replaced and \
        load_tensor(adapter.replaced[emb]).equal(load_tensor(adapter.replaced[head]))


def _tied_head_copy(adapter: Adapter, base: Checkpoint) -> str | None:
    """The head tensor of a tied pair trained together, when the base stores the pair once (as its
    embedding): the embedding written carries it. None otherwise."""
    names = _tied_names(base)
    if names is None or names[1] in base.tensors or not _trained_together(adapter, names):
        return None
    return names[1]


def _tie_problems(adapter: Adapter, base: Checkpoint, base_label: str) -> list[str]:
    """A base that ties its head to its embedding computes with one matrix for both: an adapter that replaced
    one of them apart from the other (trained without keeping the tie) has no merged checkpoint that
    computes what was trained."""
    names = _tied_names(base)
    if names is None or not set(names) & set(adapter.replaced) or _trained_together(adapter, names):
        return []
    return [f"{base_label} ties its output head to its embedding {names[0]}, and the adapter saved "
            f"{' and '.join(n for n in names if n in adapter.replaced)} apart from the other (trained without "
            "the tie; PEFT's ensure_weight_tying=True keeps it, as upstack's --lora-modules-to-save does): "
            "no tied checkpoint computes that model"]


def _merged_plan(name: str, base_ref: TensorRef, mod: LoraModule, dtype: str,
                 allow_nonfinite: bool = False, buffers: _Buffers | None = None) -> TensorPlan:
    buffers = buffers or _Buffers()
    fan_in_fan_out = mod.transposed

    def compute():  # chunk k+1 is computed while the writer writes chunk k
        return ahead(_merged_chunks())

    def _merged_chunks():
        import torch

        a = load_tensor(mod.a).float()
        b = load_tensor(mod.b).float()
        out_dt = getattr(torch, TORCH_DTYPE_NAMES[dtype])
        rows = base_ref.shape[0]
        if fan_in_fan_out and mod.magnitude is not None:  # row norms run across stored columns: whole tensor
            w = load_tensor(base_ref).float() + mod.scale * (b @ a).T
            norm = torch.linalg.norm(w.T, dim=1)
            w = (w * (load_tensor(mod.magnitude).float().reshape(-1) / norm)).to(out_dt)
            if not allow_nonfinite and not all_finite(w):
                raise nonfinite_error(name)
            yield tensor_to_bytes(w)
            return
        mag = load_tensor(mod.magnitude).float().reshape(-1) if mod.magnitude is not None else None
        cols = base_ref.shape[1]
        out_size = torch.empty(0, dtype=out_dt).element_size()
        step = max(1, min(rows, CHUNK_BYTES // (out_size * max(1, cols))))      # rows per output chunk
        block = max(1, min(step, BLOCK_ELEMS // max(1, cols)))                 # rows computed at once
        row_bytes = base_ref.nbytes // rows
        # Reused buffers, no temporaries: the raw base rows read, one fp32 block, and AHEAD + 2 output
        # chunks in rotation (one being written, AHEAD queued, one being computed).
        raw = buffers.get("raw", step * row_bytes)
        work = buffers.get("work", block * cols * 4).view(torch.float32)[:block * cols].view(block, cols)
        outs = [buffers.get(("out", k), step * cols * out_size) for k in range(AHEAD + 2)]
        left, right = (a.T, b.T) if fan_in_fan_out else (b, a)
        for k, lo in enumerate(range(0, rows, step)):
            hi = min(rows, lo + step)
            src = load_tensor(base_ref, (lo, hi), into=raw.numpy())
            out = outs[k % len(outs)][:(hi - lo) * cols * out_size].view(out_dt).view(hi - lo, cols)
            for b_lo in range(0, hi - lo, block):
                b_hi = min(hi - lo, b_lo + block)
                w = work[:b_hi - b_lo]
                w.copy_(src[b_lo:b_hi])
                w.addmm_(left[lo + b_lo:lo + b_hi], right, alpha=mod.scale)  # W + scale x B @ A, in place
                if mag is not None:
                    w.mul_((mag[lo + b_lo:lo + b_hi] / torch.linalg.norm(w, dim=1)).unsqueeze(1))
                out[b_lo:b_hi].copy_(w)
            if not allow_nonfinite and not all_finite(out):
                raise nonfinite_error(name)
            yield tensor_to_bytes(out)

    kind = "DoRA" if mod.magnitude is not None else "LoRA"
    return TensorPlan(name, dtype, tuple(base_ref.shape), compute=compute,
                      description=f"{kind} merge of {base_ref.name} (r={mod.a.shape[0]}, scale {mod.scale:g})")


def _replaced_plan(name: str, ref: TensorRef, dtype: str) -> TensorPlan:
    if ref.dtype == dtype:
        return TensorPlan(name, dtype, tuple(ref.shape), copy=ref, description="copy from the adapter")

    def compute():
        import torch

        yield tensor_to_bytes(load_tensor(ref).to(getattr(torch, TORCH_DTYPE_NAMES[dtype])))

    return TensorPlan(name, dtype, tuple(ref.shape), compute=compute, description=f"from the adapter -> {dtype}")


def plan_adapter_merge(base: Checkpoint, adapter: Adapter, base_label: str | None = None,
                       dtype: str | None = None, *, allow_nonfinite: bool = False) -> list[TensorPlan]:
    """A tensor plan for base + adapter: merged tensors computed, every other base tensor copied by bytes.
    Each output tensor keeps the base tensor's dtype, or takes `dtype` (floating tensors only). A merged
    tensor holding NaN or inf fails the write (CheckpointError naming it) unless `allow_nonfinite`; so does,
    before anything is written, a tensor the adapter saves whole."""
    check_adapter_matches(adapter, base, base_label or str(base.folder))
    resolve_ranks_and_scales(adapter)
    if not allow_nonfinite:
        check_replaced_finite(adapter)
    merged = {f"{m.module}.weight": m for m in adapter.modules.values()}
    buffers = _Buffers()
    plans = []
    for name, ref in base.tensors.items():
        out_dtype = dtype if dtype and ref.dtype in FLOAT_DTYPES else ref.dtype
        if name in merged:
            plans.append(_merged_plan(name, ref, merged[name], out_dtype, allow_nonfinite, buffers))
        elif name in adapter.replaced:
            plans.append(_replaced_plan(name, adapter.replaced[name], out_dtype))
        else:
            plans.append(source_plan(name, ref, dtype))
    return plans


def adapter_summary(adapter: Adapter) -> dict:
    """What an adapter changes, for reports and --dry-run."""
    cfg = adapter.config
    return {
        "adapter": str(adapter.folder), "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora")), "use_dora": bool(cfg.get("use_dora")),
        "modules": len(adapter.modules), "replaced_tensors": sorted(adapter.replaced),
        "adapter_params": sum(m.a.numel + m.b.numel + (m.magnitude.numel if m.magnitude else 0)
                              for m in adapter.modules.values()),
        "base_model": cfg.get("base_model_name_or_path"),
    }
