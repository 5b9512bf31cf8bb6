"""Writing outputs so that nothing half-written ever looks finished, and only one writer writes each.

Every command writes a folder or a file into a temporary sibling and renames it into place only when
it is complete; an existing output is refused unless the user passed --overwrite. While it writes, it
holds an exclusive lock on the output (`.OUT.lock` beside it, holding the writer's PID): a second writer
is told who holds it and stops (exit 2). Temporary siblings carry the writer's PID
(`.OUT.tmp-<pid>-<hex>`); whoever takes the lock next removes those a killed writer left. A disk that
fills up mid-write is one error line naming the output, with the partial output removed. These are the
one implementation of all of these rules.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

from upstack.errors import OutputExistsError, UpstackError

log = logging.getLogger("upstack")


class OutputBusyError(UpstackError):
    """Another live process holds the output's lock."""


class DiskFullError(UpstackError):
    """The disk filled up while writing an output (the partial output was removed)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every writer cleans up on the way out (the CLI exits 143)."""


def raise_on_sigterm(signum, frame):
    raise Terminated()


def check_output_free(out: str | Path, overwrite: bool) -> None:
    """Refuse an existing output unless --overwrite was given."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")


# ------------------------------------------------------------------------------------------------
# One writer per output

_HELD: dict[str, list] = {}   # lock path -> [open file, depth]: this process's locks (re-entrant)


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.lock"


def _holder(lock: Path) -> str:
    try:
        text = lock.read_text().split("\n", 1)
    except OSError:
        text = [""]
    pid, _, started = text[0].partition(" ")
    if not pid.isdigit():
        return "another process"
    return f"process {pid}" + (f" (started {started})" if started else "")


@contextlib.contextmanager
def output_lock(out: str | Path, what: str = "written"):
    """Hold an exclusive lock on `out` (flock on `.OUT.lock` beside it, holding this PID and start time).

    A second writer gets OutputBusyError naming the holder; a lock whose holder died is free (the kernel
    drops a dead process's flock) and simply taken over. Re-entrant within one process. On the first
    acquisition, temporary siblings of `out` left by killed writers are removed (one line says so)."""
    lock = lock_path(out)
    key = str(lock.absolute())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        f = open(lock, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise OutputBusyError(f"{out} is being {what} by {_holder(lock)}; wait for it or stop it") from None
        try:  # the file may have been removed by its previous holder between our open and our lock
            same = os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {started}\n")
    f.flush()
    _HELD[key] = [f, 1]
    try:
        remove_leftovers(out)
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            lock.unlink()
        f.close()   # releases the flock


def _tmp_name(out: Path, kind: str = "tmp") -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _tree_bytes(p: Path) -> int:
    if p.is_file() or p.is_symlink():
        return p.lstat().st_size
    return sum(f.lstat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def remove_leftovers(out: str | Path) -> list[Path]:
    """Remove the temporary siblings (`.OUT.tmp-*`, `.OUT.old-*`) of `out` that no live writer owns.

    Called with the lock held, so any such sibling not written by this process belongs to a writer that
    was killed (SIGKILL, power loss) before it could clean up."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(?:(\d+)-)?[0-9a-f]+")
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if not m or (m.group(1) and int(m.group(1)) == os.getpid()):
            continue
        size = _tree_bytes(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        who = f"by process {m.group(1)}, no longer running," if m.group(1) else "by an earlier writer"
        log.warning(f"removed {p.name} ({size / 1e6:.1f} MB), left {who} while writing {out}")
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------------------
# Disk full

def is_disk_full(e: BaseException) -> bool:
    """An OSError ENOSPC, or a library's wrapping of one (torch, safetensors name it only in the message)."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text


def disk_full_error(where: str | Path, need_bytes: int | None = None) -> DiskFullError:
    """The one-line error for a full disk while writing `where` (its partial output already removed)."""
    parent = Path(where).parent
    with contextlib.suppress(OSError):
        while not parent.exists():
            parent = parent.parent
    try:
        free_bytes = shutil.disk_usage(parent).free
    except OSError:
        free_bytes = None
    need_text, free_text = format_sizes(need_bytes or 0, free_bytes or 0)
    free = f"; {free_text} free in {parent}" if free_bytes is not None else ""
    need = f", about {need_text} needed" if need_bytes else ""
    return DiskFullError(f"disk full while writing {where} (the partial output was removed{need}{free})")


def format_sizes(*sizes: int) -> list[str]:
    """Byte counts for one message, each in GB from 1 GB, else MB, KB or bytes, with two decimals, or more
    where two different sizes would read the same: "12.35 MB needed; 12.31 MB free", never
    "0.01 GB needed; 0.01 GB free"."""
    def text(n: int, decimals: int) -> str:
        unit, scale = next(((u, s) for u, s in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)) if n >= s),
                           ("bytes", 1))
        return f"{n} bytes" if scale == 1 else f"{n / scale:.{decimals}f} {unit}"

    for decimals in range(2, 10):
        texts = [text(n, decimals) for n in sizes]
        if len(set(texts)) == len(set(sizes)):
            return texts
    return [f"{n:,} bytes" for n in sizes]


# ------------------------------------------------------------------------------------------------
# Atomic folders and files

@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False, need_bytes: int | None = None):
    """Yield a temporary sibling folder of `out`; rename it to `out` only when the block succeeds.

    Holds the lock on `out` throughout. On any failure (exception, Ctrl-C, SIGTERM, disk full) the
    temporary folder is removed, so `out` never appears half-written; a full disk becomes DiskFullError.
    An existing `out` is refused unless `overwrite`, and then replaced only after the new one is complete.
    """
    out = Path(out)
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(out):
        check_output_free(out, overwrite)  # a writer that held the lock may have finished meanwhile
        tmp = _tmp_name(out)
        tmp.mkdir()
        try:
            yield tmp
            if out.exists():
                old = _tmp_name(out, "old")
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e) and not isinstance(e, UpstackError):
                raise disk_full_error(out, need_bytes) from None
            raise


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling path of `path`; the caller writes it, and it replaces `path` only when
    the block succeeds (removed on any failure). Holds the lock on `path` throughout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        tmp = _tmp_name(path)
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if is_disk_full(e) and not isinstance(e, UpstackError):
                raise disk_full_error(path) from None
            raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a whole text file (UTF-8) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# ------------------------------------------------------------------------------------------------
# What identifies an input, for caches and resumes

SMALL_FILE = 8 << 20   # files up to this size are identified by their content, larger ones by size and mtime


def file_identity(path: str | Path) -> str:
    """A short fingerprint of a file's content: a hash of the whole file when small, else its size,
    mtime_ns and a hash of its first and last MiB. A folder: the identities of its files."""
    p = Path(path)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")):
            if f.is_file():
                h.update(f"{f.relative_to(p)}={file_identity(f)}\n".encode())
        return h.hexdigest()[:16]
    if not p.is_file():
        return "missing"
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if st.st_size <= SMALL_FILE:
            h.update(f.read())
            return f"{st.st_size}:{h.hexdigest()[:16]}"
        h.update(f.read(1 << 20))
        f.seek(st.st_size - (1 << 20))
        h.update(f.read())
    return f"{st.st_size}:{st.st_mtime_ns}:{h.hexdigest()[:16]}"
