"""Reading HF checkpoint folders: strict safetensors headers, the one path/symlink/pickle gate, tensor bytes.

Every byte read of a checkpoint goes through this package: `open_checkpoint` validates a folder and
says where each tensor's bytes are (`TensorRef`); `read_tensor_bytes`/`load_tensor` read them
(`blocks.TensorBlockReader` for the block-wise reads of a streaming merge).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import stat
import struct
from pathlib import Path

from upstack.checkpoint.dtypes import DTYPE_SIZES, TORCH_DTYPE_NAMES
from upstack.errors import CheckpointError
from upstack.hub import hub_offline, is_hub_id, offline_reason

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


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


_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words, from its st_mode."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "a special file")


def not_regular_error(path: str | Path, mode: int) -> CheckpointError:
    return CheckpointError(f"{path}: is {file_kind(mode)}, not a regular file (reading it would block or never "
                           "end); a checkpoint's files must be regular files")


def _open_regular(path: Path):
    """`path` opened for reading, refused unless it is a regular file. The open does not block (O_NONBLOCK:
    opening a FIFO waits for a writer otherwise) and the check is made on the opened file (fstat), so a
    file swapped in between cannot get past it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular_error(path, mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


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
        with _open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
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
    if p.exists() or not is_hub_id(str(source)):
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.tiktoken", "*.txt"]))
    except Exception as e:  # offline, gated, missing: all become one message
        why = f"the machine is offline ({offline_reason()})" if hub_offline() else f"{type(e).__name__}: {e}"
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
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    checked_file(folder, cfg_path)
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot parse ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: must hold a JSON object")
    return config


# Non-weight files a checkpoint folder carries along (tokenizer, chat template, generation config) and that
# the gate checks with the weights: the writer copies them into outputs, transformers reads them.
AUX_FILE_PATTERNS = (
    "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
    "chat_template.*", "generation_config.json", "*.tiktoken", "spiece.model", "sentencepiece*.model",
    "preprocessor_config.json", "upstack.json",
)


def _allowed_roots(folder: Path) -> list[Path]:
    """Where the files of `folder` may really live: the folder itself, and for a Hugging Face cache
    snapshot (models--org--name/snapshots/<rev>/) that repository's blobs/ folder, where the cache keeps
    the files its snapshot links point to."""
    real = folder.resolve()
    roots = [real]
    repo = real.parent.parent
    if real.parent.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
        roots.append((repo / "blobs").resolve())
    return roots


def checked_file(folder: str | Path, path: str | Path) -> Path:
    """`path` (a file of checkpoint folder `folder`), refused when it resolves -- through a symlink of its
    own or of a folder on the way -- outside the folder, or when it is not a regular file (a FIFO or a
    device would block or never end when read). The Hugging Face cache layout is the one exception to the
    first rule: a snapshot's links into its own repository's blobs/ are accepted. A missing file passes
    (its caller says what is missing). Returns `path`."""
    folder, path = Path(folder), Path(path)
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in _allowed_roots(folder)):
        raise CheckpointError(f"{path}: refused: it links to {real}, outside the checkpoint folder {folder} "
                              "(copy the file into the folder, or link only within it)")
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        return path
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        raise not_regular_error(path, mode)
    return path


def aux_files(folder: Path) -> list[Path]:
    """The folder's aux files (AUX_FILE_PATTERNS), each checked by `checked_file` (a FIFO or device with
    such a name is refused, not skipped: transformers would open it). Folders are not aux files."""
    return [checked_file(folder, f) for f in sorted(folder.iterdir())
            if any(fnmatch.fnmatch(f.name, pat) for pat in AUX_FILE_PATTERNS) and f.exists() and not f.is_dir()]


def check_tokenizer_folder(folder: str | Path) -> Path:
    """The gate for a tokenizer folder given apart from its model: its tokenizer and other aux files, and
    config.json if it has one (transformers reads it to pick the tokenizer class), inside the folder and
    regular files. Returns the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: " + ("not a folder (a tokenizer is a folder)" if folder.exists()
                                               else "no such folder"))
    aux_files(folder)
    checked_file(folder, folder / "config.json")
    return folder


PICKLE_REFUSED = ("which can run code when loaded; convert to safetensors or pass --allow-pickle (then loaded "
                  "with torch.load(weights_only=True))")


def _embedded_adapter(folder: Path, allow_pickle: bool) -> None:
    """A PEFT adapter stored inside a model folder: transformers loads it on top of the model
    (adapter_config.json found beside config.json), so its files pass the gate like the model's."""
    cfg = folder / "adapter_config.json"
    if not cfg.exists():
        return
    checked_file(folder, cfg)
    st, pk = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.exists():
        read_safetensors_header(checked_file(folder, st))
    elif pk.exists():
        checked_file(folder, pk)
        if not allow_pickle:
            raise CheckpointError(f"{pk}: the adapter inside the model folder is pickled, {PICKLE_REFUSED}")


def _safe_member(folder: Path, rel: object, index_path: Path) -> Path:
    """Resolve a file named by an index; refuse absolute paths and anything outside `folder`."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{index_path}: weight_map values must be file names, got {rel!r}")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or ".." in Path(rel).parts or "\\" in rel:
        raise CheckpointError(f"{index_path}: refuses file {rel!r}: paths must stay inside the checkpoint folder")
    return checked_file(folder, folder / rel)


def open_checkpoint(folder: str | Path, *, allow_pickle: bool = False, weights_required: bool = True) -> Checkpoint:
    """Open a HF checkpoint folder (safetensors, sharded or single; pickled .bin only with allow_pickle).

    The one gate every command passes before it reads a checkpoint. Validates: config.json parses; no
    file it reads (config, index, weights, tokenizer and other aux files, an adapter transformers would
    load with the model) resolves outside the folder (`checked_file`: symlinks too; the Hugging Face
    cache's blobs/ excepted) or is anything but a regular file (a FIFO would block the reader); an index
    names only files inside the folder that exist; every tensor in the index is in the named shard and
    every shard tensor is in the index; headers are strict (see read_safetensors_header). Raises
    CheckpointError otherwise.
    """
    folder = Path(folder)
    config = read_config(folder)
    aux_files(folder)
    _embedded_adapter(folder, allow_pickle)
    st_index = folder / "model.safetensors.index.json"
    bin_index = folder / "pytorch_model.bin.index.json"
    single = folder / "model.safetensors"
    if st_index.is_file():
        return Checkpoint(folder, config, *_open_indexed(folder, checked_file(folder, st_index)))
    if single.is_file():
        tensors = read_safetensors_header(checked_file(folder, single))
        return Checkpoint(folder, config, tensors, [single])
    others = [checked_file(folder, f) for f in sorted(folder.glob("*.safetensors"))]
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
            raise CheckpointError(f"{folder}: weights are pickled .bin files, {PICKLE_REFUSED}")
        for f in bins:
            checked_file(folder, f)
        return Checkpoint(folder, config, *_open_pickled(folder, bin_index))
    if weights_required:
        raise CheckpointError(f"{folder}: no weights found (no *.safetensors or index file)")
    return Checkpoint(folder, config, {}, [])


def read_index(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: cannot parse ({e})") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise CheckpointError(f"{index_path}: missing 'weight_map' object")
    return index


def _open_indexed(folder: Path, index_path: Path):
    weight_map = read_index(index_path)["weight_map"]
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
        weight_map = read_index(bin_index)["weight_map"]
        files = {rel: _safe_member(folder, rel, bin_index) for rel in dict.fromkeys(weight_map.values())}
    else:
        files = {p.name: checked_file(folder, p) for p in sorted(folder.glob("*.bin"))}
    tensors: dict[str, TensorRef] = {}
    rev = {v: k for k, v in TORCH_DTYPE_NAMES.items()}
    for rel, p in files.items():
        if not p.is_file():
            raise CheckpointError(f"{folder}: weight file {rel!r} is missing")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for corrupt/unsafe pickles
            raise CheckpointError(f"{p}: cannot load with weights_only=True ({_pickle_reason(e)})") from None
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


def _pickle_reason(e: Exception) -> str:
    """torch.load's refusal in one line: for a pickle that calls something (weights_only refuses it), the
    line naming what it calls, not torch's paragraphs (which suggest turning weights_only off)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "GLOBAL" in ln or "Unsupported operand" in ln or "unsupported" in ln.lower()]
    why = (named or lines or [""])[0]
    if named:
        why += "; the file may run code when loaded: do not load it without weights_only"
    return f"{type(e).__name__}: {why}".rstrip(": ")


def read_tensor_bytes(ref: TensorRef, start: int = 0, end: int | None = None, into: bytearray | None = None):
    """Bytes [start, end) of a stored tensor: a fresh buffer, safe to modify; or, with `into` (a reusable
    buffer of at least end - start bytes), a memoryview of its first end - start bytes."""
    end = ref.nbytes if end is None else end
    if ref.tensor is not None:
        import torch

        flat = ref.tensor.reshape(-1).view(torch.uint8) if ref.tensor.numel() else ref.tensor.reshape(-1)
        data = flat[start:end].numpy().tobytes()
        if into is None:
            return bytearray(data)
        view = memoryview(into)[:end - start]
        view[:] = data
        return view
    buf = bytearray(end - start) if into is None else memoryview(into)[:end - start]
    with open(ref.path, "rb") as f:
        f.seek(ref.offset + start)
        got = f.readinto(buf)
    if got != len(buf):
        raise CheckpointError(f"{ref.path}: tensor {ref.name!r} is truncated")
    return buf


def load_tensor(ref: TensorRef, rows: tuple[int, int] | None = None, into: bytearray | None = None):
    """A stored tensor (or rows [a, b) of its first dim) as a torch tensor of its own dtype; with `into`, a
    view of that reusable buffer (valid until the buffer is reused)."""
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
    buf = read_tensor_bytes(ref, start, end, into)
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
