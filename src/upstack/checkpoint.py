"""Hugging Face checkpoint folders: a strict lazy reader, tensor plans, one streaming sharded writer, verify.

Plan, then stream: surgery (upscale, merge) builds a list of `TensorPlan`s, each saying how to make one
output tensor -- a byte-range copy of a source tensor, or a function yielding its bytes -- and
`write_checkpoint` validates the whole plan before it touches the output, then streams it into
sharded safetensors. Pure copies go through `os.copy_file_range` (kernel-side, never through Python
memory), so this module does not import torch; computed tensors import it lazily.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from upstack.errors import CheckpointError, UpstackError
from upstack.outputs import atomic_output_dir

# safetensors dtype name -> bytes per element
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
# user-facing dtype names (--dtype) -> safetensors name
DTYPE_ALIASES = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
}
# safetensors name -> torch dtype name (for computed tensors and config.json "dtype")
TORCH_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# Non-weight files a checkpoint folder carries along: tokenizer, chat template, generation config.
AUX_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "generation_config.json", "*.tiktoken", "spiece.model", "sentencepiece*.model",
    "preprocessor_config.json", "upstack.json",
)


def normalize_dtype(name: str) -> str:
    """'bf16' / 'bfloat16' / 'BF16' -> 'BF16'; raise ConfigError-like UpstackError for unknown names."""
    key = name.strip()
    if key.upper() in DTYPE_SIZES:
        return key.upper()
    if key.lower() in DTYPE_ALIASES:
        return DTYPE_ALIASES[key.lower()]
    raise UpstackError(f"unknown dtype {name!r} (use one of float32, bfloat16, float16)")


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorRef:
    """Where one stored tensor's bytes live: `nbytes` bytes at absolute `offset` of `path`.

    For pickled .bin checkpoints (loaded only with --allow-pickle) `tensor` holds the loaded tensor
    and `path`/`offset` are unused.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int
    tensor: object = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_safetensors_header(path: str | Path) -> dict[str, TensorRef]:
    """Parse and strictly validate one .safetensors file's header; return its tensors in file order.

    Checks (as the format page demands): 8-byte little-endian header length within the file and
    under 100 MiB; UTF-8 JSON object; every entry has a known dtype, a list of non-negative int
    dims, and data_offsets [begin, end] with end - begin == numel * itemsize; the byte ranges are
    contiguous from 0 and cover the data section exactly (no gaps, overlaps or trailing bytes).
    Raises CheckpointError naming the file and the problem; never anything else.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {len(head)} bytes; truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(
                    f"{path}: header length {n} is larger than the file ({size} bytes) or the 100 MiB limit "
                    "(truncated or not a safetensors file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: header is not valid UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header must be a JSON object")
    data_start = 8 + n
    data_len = size - data_start
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    entries = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets) or offsets[1] < offsets[0]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end")
        if len(shape) > 64:
            raise CheckpointError(f"{where}: too many dimensions ({len(shape)})")
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != expected:
            raise CheckpointError(
                f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {expected}")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort()
    pos = 0
    for begin, end, name, _, _ in entries:
        if begin != pos:
            kind = "overlaps the previous tensor" if begin < pos else f"leaves a gap at byte {pos}"
            raise CheckpointError(f"{path}: tensor {name!r} {kind} (offsets must be contiguous)")
        pos = end
    if pos != data_len:
        what = "is truncated" if pos > data_len else "has trailing bytes"
        raise CheckpointError(
            f"{path}: file {what}: tensors need {pos} data bytes, file has {data_len} (corrupt or partial download?)")
    return {name: TensorRef(name, dtype, shape, path, data_start + begin, end - begin)
            for begin, end, name, dtype, shape in entries}


@dataclasses.dataclass
class Checkpoint:
    """A HF checkpoint folder opened lazily: its config and where each tensor's bytes are."""

    folder: Path
    config: dict
    tensors: dict[str, TensorRef]
    weight_files: list[Path]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return counts


def resolve_model_dir(source: str | Path) -> Path:
    """A local checkpoint folder for `source`: the folder itself, or a hub id fetched into the HF cache.

    Hub ids (owner/name that is not a local path) are downloaded with huggingface_hub when online;
    offline, a clear error says so.
    """
    p = Path(source).expanduser()
    if p.exists() or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", str(source)):
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.tiktoken", "*.txt"]))
    except Exception as e:  # offline, gated, missing: all become one message
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        why = "the machine is offline (HF_HUB_OFFLINE=1)" if offline else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{source}: not a local folder, and fetching it from the Hugging Face hub failed "
                              f"({why}); download it first (huggingface-cli download {source} --local-dir DIR) "
                              "and pass the folder") from None


def read_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (expected a Hugging Face checkpoint folder)")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot parse ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: must hold a JSON object")
    return config


def _safe_member(folder: Path, rel: object, index_path: Path) -> Path:
    """Resolve a file named by an index; refuse absolute paths and anything outside `folder`."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{index_path}: weight_map values must be file names, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in Path(rel).parts or "\\" in rel:
        raise CheckpointError(f"{index_path}: refuses file {rel!r}: paths must stay inside the checkpoint folder")
    p = (folder / rel).resolve()
    if not p.is_relative_to(folder.resolve()):
        raise CheckpointError(f"{index_path}: refuses file {rel!r}: it resolves outside the checkpoint folder")
    return folder / rel


def open_checkpoint(folder: str | Path, *, allow_pickle: bool = False, weights_required: bool = True) -> Checkpoint:
    """Open a HF checkpoint folder (safetensors, sharded or single; pickled .bin only with allow_pickle).

    Validates: config.json parses; an index names only files inside the folder that exist; every
    tensor in the index is in the named shard and every shard tensor is in the index; headers are
    strict (see read_safetensors_header). Raises CheckpointError otherwise.
    """
    folder = Path(folder)
    config = read_config(folder)
    st_index = folder / "model.safetensors.index.json"
    bin_index = folder / "pytorch_model.bin.index.json"
    single = folder / "model.safetensors"
    if st_index.is_file():
        return Checkpoint(folder, config, *_open_indexed(folder, st_index))
    if single.is_file():
        tensors = read_safetensors_header(single)
        return Checkpoint(folder, config, tensors, [single])
    others = sorted(folder.glob("*.safetensors"))
    if others:
        tensors: dict[str, TensorRef] = {}
        for f in others:
            for name, ref in read_safetensors_header(f).items():
                if name in tensors:
                    raise CheckpointError(f"{f}: tensor {name!r} also stored in {tensors[name].path.name}")
                tensors[name] = ref
        return Checkpoint(folder, config, tensors, others)
    bins = [bin_index] if bin_index.is_file() else sorted(folder.glob("*.bin"))
    if bins:
        if not allow_pickle:
            raise CheckpointError(
                f"{folder}: weights are pickled .bin files, which can run code when loaded; convert them to "
                "safetensors or pass --allow-pickle (then loaded with torch.load(weights_only=True))")
        return Checkpoint(folder, config, *_open_pickled(folder, bin_index))
    if weights_required:
        raise CheckpointError(f"{folder}: no weights found (no *.safetensors or index file)")
    return Checkpoint(folder, config, {}, [])


def _read_index(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: cannot parse ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{index_path}: missing 'weight_map' object")
    return index


def _open_indexed(folder: Path, index_path: Path):
    weight_map = _read_index(index_path)["weight_map"]
    files: dict[str, Path] = {}
    for name, rel in weight_map.items():
        files.setdefault(rel, _safe_member(folder, rel, index_path))
    headers = {}
    for rel, p in files.items():
        if not p.is_file():
            raise CheckpointError(f"{index_path}: names {rel!r}, which is missing from {folder}")
        headers[rel] = read_safetensors_header(p)
    tensors: dict[str, TensorRef] = {}
    for name, rel in weight_map.items():
        if name not in headers[rel]:
            raise CheckpointError(f"{index_path}: tensor {name!r} is mapped to {rel}, which does not contain it")
        tensors[name] = headers[rel][name]
    for rel, hdr in headers.items():
        extra = sorted(set(hdr) - {n for n, r in weight_map.items() if r == rel})
        if extra:
            raise CheckpointError(
                f"{index_path}: {rel} holds tensor(s) the index does not list: {', '.join(extra[:5])}")
    return tensors, list(files.values())


def _open_pickled(folder: Path, bin_index: Path):
    import torch

    if bin_index.is_file():
        weight_map = _read_index(bin_index)["weight_map"]
        files = {rel: _safe_member(folder, rel, bin_index) for rel in dict.fromkeys(weight_map.values())}
    else:
        files = {p.name: p for p in sorted(folder.glob("*.bin"))}
    tensors: dict[str, TensorRef] = {}
    rev = {v: k for k, v in TORCH_DTYPE_NAMES.items()}
    for rel, p in files.items():
        if not p.is_file():
            raise CheckpointError(f"{folder}: weight file {rel!r} is missing")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for corrupt/unsafe pickles
            raise CheckpointError(f"{p}: cannot load with weights_only=True ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{p}: expected a state dict of tensors")
        for name, t in state.items():
            if not isinstance(t, torch.Tensor):
                raise CheckpointError(f"{p}: entry {name!r} is not a tensor")
            dtype = rev.get(str(t.dtype).removeprefix("torch."))
            if dtype is None:
                raise CheckpointError(f"{p}: tensor {name!r} has unsupported dtype {t.dtype}")
            tensors[name] = TensorRef(name, dtype, tuple(t.shape), p, 0, t.numel() * DTYPE_SIZES[dtype],
                                      tensor=t.contiguous())
    return tensors, list(files.values())


def read_tensor_bytes(ref: TensorRef, start: int = 0, end: int | None = None) -> bytearray:
    """Bytes [start, end) of a stored tensor (a fresh buffer, safe to modify)."""
    end = ref.nbytes if end is None else end
    if ref.tensor is not None:
        import torch

        flat = ref.tensor.reshape(-1).view(torch.uint8) if ref.tensor.numel() else ref.tensor.reshape(-1)
        return bytearray(flat[start:end].numpy().tobytes())
    buf = bytearray(end - start)
    with open(ref.path, "rb") as f:
        f.seek(ref.offset + start)
        got = f.readinto(buf)
    if got != len(buf):
        raise CheckpointError(f"{ref.path}: tensor {ref.name!r} is truncated")
    return buf


def load_tensor(ref: TensorRef, rows: tuple[int, int] | None = None):
    """A stored tensor (or rows [a, b) of its first dim) as a torch tensor of its own dtype."""
    import torch

    if ref.tensor is not None:
        t = ref.tensor
        return (t[rows[0]:rows[1]] if rows else t).clone()
    shape = list(ref.shape)
    start, end = 0, ref.nbytes
    if rows is not None:
        row_bytes = ref.nbytes // shape[0] if shape and shape[0] else 0
        start, end = rows[0] * row_bytes, rows[1] * row_bytes
        shape[0] = rows[1] - rows[0]
    buf = read_tensor_bytes(ref, start, end)
    dt = getattr(torch, TORCH_DTYPE_NAMES[ref.dtype])
    if not buf:
        return torch.empty(shape, dtype=dt)
    return torch.frombuffer(buf, dtype=dt).reshape(shape)


def tensor_to_bytes(t) -> memoryview:
    """Raw little-endian bytes of a torch tensor in its own dtype (bf16 and fp8 included)."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# --------------------------------------------------------------------------------------------------
# Plans and the writer
# --------------------------------------------------------------------------------------------------

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
    """Copy tokenizer, chat template and generation config files from a checkpoint folder."""
    import fnmatch

    copied = []
    if src is None:
        return copied
    skip = set(skip)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name not in skip and any(fnmatch.fnmatch(f.name, pat) for pat in AUX_FILE_PATTERNS):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


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
    shards = assign_shards(plans, shard_size)
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(p.nbytes for p in plans)
    meta = {"format": "pt", **(metadata or {})}
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress,
               leave=False)
    src_fds: dict[Path, int] = {}
    try:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            for shard_name, shard in zip(names, shards):
                _write_shard(tmp / shard_name, shard, meta, src_fds, bar)
            weight_map = {p.name: shard_name for shard_name, shard in zip(names, shards) for p in shard}
            if n > 1:
                index = {"metadata": {"total_size": total}, "weight_map": weight_map}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
            copy_aux_files(Path(aux_from) if aux_from else None, tmp, skip=set(extra_files or {}))
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            for fname, text in (extra_files or {}).items():
                (tmp / fname).write_text(text)
            if model_card is not None:
                (tmp / "README.md").write_text(model_card)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while writing {out} (nothing was left behind; "
                                  f"{total / 1e9:.2f} GB of tensors needed)") from None
        raise
    finally:
        bar.close()
        for fd in src_fds.values():
            os.close(fd)
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


# --------------------------------------------------------------------------------------------------
# Inspect and verify
# --------------------------------------------------------------------------------------------------

def inspect_checkpoint(folder: str | Path, *, allow_pickle: bool = False) -> dict:
    """Facts about a checkpoint folder: architecture, sizes, dtypes, tied embeddings, per-layer fields."""
    from upstack.arch import ARCHS, GENERIC

    folder = Path(folder)
    ckpt = open_checkpoint(folder, allow_pickle=allow_pickle, weights_required=False)
    cfg = ckpt.config
    arch = ARCHS.get(cfg.get("model_type"), GENERIC)
    per_layer = {f.name: cfg[f.name] for f in arch.layer_fields if f.name in cfg}
    disk = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    provenance = None
    if (folder / "upstack.json").is_file():
        try:
            provenance = json.loads((folder / "upstack.json").read_text())
        except (OSError, json.JSONDecodeError):
            provenance = None
    return {
        "folder": str(folder),
        "model_type": cfg.get("model_type"),
        "architectures": cfg.get("architectures"),
        "supported": cfg.get("model_type") in ARCHS,
        "num_hidden_layers": cfg.get(arch.layer_count_key),
        "hidden_size": cfg.get("hidden_size"),
        "intermediate_size": cfg.get("intermediate_size"),
        "num_attention_heads": cfg.get("num_attention_heads"),
        "num_key_value_heads": cfg.get("num_key_value_heads"),
        "vocab_size": cfg.get("vocab_size"),
        "num_parameters": ckpt.num_parameters,
        "dtypes": ckpt.dtypes,
        "config_dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "tensor_bytes": ckpt.total_bytes,
        "bytes_on_disk": disk,
        "num_tensors": len(ckpt.tensors),
        "weight_files": [p.name for p in ckpt.weight_files],
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "has_lm_head": any(n.endswith("lm_head.weight") for n in ckpt.tensors),
        "per_layer_fields": per_layer,
        "upstack": provenance,
    }


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes transformers expects for this config (meta device, no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = {k: v for k, v in config.items() if k != "architectures"}
    model_type = cfg_dict.pop("model_type", None)
    if not model_type:
        return None
    try:
        cfg = AutoConfig.for_model(model_type, **cfg_dict)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except Exception:  # unknown or remote-code architectures: shape check not possible
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def verify_checkpoint(folder: str | Path, *, load: bool = False, allow_pickle: bool = False) -> dict:
    """Check a checkpoint folder is complete and consistent; optionally load it and run a forward pass.

    Returns {"ok", "problems", "warnings", "checks"}. Structural problems that make the folder
    unreadable (bad header, missing shard, unsafe index path) are reported as problems too.
    """
    from upstack.arch import ARCHS, GENERIC, split_layer_name

    folder = Path(folder)
    problems: list[str] = []
    warnings: list[str] = []
    checks: list[str] = []
    try:
        ckpt = open_checkpoint(folder, allow_pickle=allow_pickle)
    except CheckpointError as e:
        if not folder.is_dir():
            raise
        return {"ok": False, "problems": [str(e)], "warnings": [], "checks": []}
    checks.append(f"{len(ckpt.weight_files)} weight file(s), headers strict and complete, index consistent")
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        total = _read_index(index_path).get("metadata", {}).get("total_size")
        if total is None:
            warnings.append("index has no metadata.total_size")
        elif total != ckpt.total_bytes:
            problems.append(f"index metadata.total_size={total} but tensors hold {ckpt.total_bytes} bytes")
        else:
            checks.append(f"index total_size {total} matches")
    cfg = ckpt.config
    arch = ARCHS.get(cfg.get("model_type"))
    if arch is None:
        warnings.append(f"model_type {cfg.get('model_type')!r} is not in upstack's architecture table")
        arch = GENERIC
    n = cfg.get(arch.layer_count_key)
    seen_layers = {s[0] for s in (split_layer_name(k, arch) for k in ckpt.tensors) if s}
    if type(n) is int:
        if seen_layers != set(range(n)):
            missing = sorted(set(range(n)) - seen_layers)
            extra = sorted(seen_layers - set(range(n)))
            problems.append(f"config says {n} layers; layers missing: {missing[:10]}, unexpected: {extra[:10]}")
        else:
            checks.append(f"{n} layers present")
        for f in arch.layer_fields:
            if f.kind == "list" and isinstance(cfg.get(f.name), list) and len(cfg[f.name]) != n:
                problems.append(f"config {f.name} has {len(cfg[f.name])} entries for {n} layers")
    expected = _expected_shapes(cfg)
    if expected is None:
        warnings.append("transformers cannot build this config; tensor shapes not checked against it")
    else:
        tied = bool(cfg.get("tie_word_embeddings", False))
        for name, shape in expected.items():
            ref = ckpt.tensors.get(name)
            if ref is None:
                if not (tied and name.endswith("lm_head.weight")):
                    problems.append(f"tensor {name} {list(shape)} expected by config is missing")
            elif tuple(ref.shape) != shape:
                problems.append(f"tensor {name} has shape {list(ref.shape)}, config implies {list(shape)}")
        unexpected = sorted(set(ckpt.tensors) - set(expected))
        if unexpected:
            warnings.append(f"{len(unexpected)} tensor(s) the model does not use, e.g. {unexpected[0]}")
        if not problems:
            checks.append(f"all {len(expected)} tensor shapes match config.json")
    if load and not problems:
        problems += _load_and_forward(folder, checks)
    return {"ok": not problems, "problems": problems, "warnings": warnings, "checks": checks}


def _load_and_forward(folder: Path, checks: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except Exception as e:  # report any loader failure as a verify problem
        return [f"transformers could not load the folder: {type(e).__name__}: {e}"]
    vocab = model.config.vocab_size
    ids = torch.arange(min(8, vocab)).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        return ["forward pass gave non-finite logits"]
    checks.append(f"loaded with AutoModelForCausalLM; forward pass logits {list(logits.shape)} finite")
    return []
