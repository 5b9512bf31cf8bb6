"""Writing outputs so that nothing half-written ever looks finished, and only one writer writes each.

Every command writes a folder or a file into a temporary sibling and renames it into place only when
it is complete; an existing output is refused unless the user passed --overwrite. While it writes, it
holds an exclusive lock on the output (`.OUT.lock` beside it, holding the writer's PID): a second writer
is told who holds it and stops (exit 2). Temporary siblings carry the writer's PID
(`.OUT.tmp-<pid>-<hex>`); whoever takes the lock next removes those a killed writer left. `--overwrite`
moves the old OUT aside (`.OUT.old-<pid>-<hex>`: always a complete copy) before the new one takes its
place; a writer killed between the two renames leaves OUT missing, and the next writer restores the old
copy. A disk that fills up mid-write is one error line naming the output, with the partial output removed.
Nothing here writes through a symbolic link: locks are opened with O_NOFOLLOW, and files written into an
existing folder are new files renamed into place (`write_file`). These are the one implementation of all
of these rules.
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
import stat
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
    """`.OUT.lock` beside `out`, in the real folder (a path through a linked folder takes the same lock)."""
    out = Path(out)
    return out.parent.resolve() / f".{out.name}.lock"


class LinkRefusedError(UpstackError):
    """A symbolic link (or another file's hard link) sits where upstack would write a file."""


def _open_lock(lock: Path):
    """Open (or create) the lock file without following a link planted there; refuse a link, anything that
    is not a plain file, and a hard link of another file (writing the PID would write into it)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(lock, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP or lock.is_symlink():
            raise LinkRefusedError(f"{lock} is a symbolic link; upstack writes its lock file there and does not "
                                   f"write through links (remove it)") from None
        raise
    st = os.fstat(fd)  # (no links at all: its holder just removed it; output_lock then tries again)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "not a plain file" if not stat.S_ISREG(st.st_mode) else "a hard link of another file"
        raise LinkRefusedError(f"{lock} is {what}; upstack writes its lock file there (remove it)")
    return os.fdopen(fd, "r+")


def _holder(f) -> str:
    try:
        f.seek(0)
        text = f.read().split("\n", 1)
    except (OSError, ValueError):
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
        f = _open_lock(lock)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(f)
            f.close()
            raise OutputBusyError(f"{out} is being {what} by {holder}; wait for it or stop it") from None
        try:  # the file may have been removed (or replaced) by its previous holder between our open and lock
            same = os.fstat(f.fileno()).st_ino == os.lstat(lock).st_ino
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


def _remove(p: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder tree."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def remove_leftovers(out: str | Path) -> list[Path]:
    """Remove the temporary siblings (`.OUT.tmp-*`, `.OUT.old-*`) of `out` that no live writer owns; but
    when `out` is missing, first restore an `.OUT.old-*`: the complete copy a writer killed between the
    two renames of --overwrite moved aside (the last complete copy is never deleted).

    Called with the lock held, so any such sibling not written by this process belongs to a writer that
    was killed (SIGKILL, power loss) before it could clean up."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(?:(\d+)-)?[0-9a-f]+")
    removed = []
    if not out.parent.is_dir():
        return removed
    found = [(p, m) for p in out.parent.iterdir() if (m := pattern.fullmatch(p.name))
             and not (m.group(2) and int(m.group(2)) == os.getpid())]
    for p, m in sorted(found, key=lambda pm: (pm[1].group(1) != "old", pm[0].name)):  # .old-* first
        who = f"by process {m.group(2)}, no longer running," if m.group(2) else "by an earlier writer"
        if m.group(1) == "old" and not os.path.lexists(out):
            os.rename(p, out)
            log.warning(f"restored {out} from {p.name}, the complete copy left {who} while replacing it")
            continue
        size = _tree_bytes(p)
        _remove(p)
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
            _swap_into_place(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if is_disk_full(e) and not isinstance(e, UpstackError):
                raise disk_full_error(out, need_bytes) from None
            raise


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the complete `tmp` to `out`, replacing an existing `out` so that a complete copy exists at
    every moment under a name the next writer keeps: `out`, or between the two renames `.OUT.old-*`, which
    the next writer restores (remove_leftovers). The old copy is renamed to a temporary name before it is
    deleted, so a half-deleted copy is never taken for a complete one."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    old = _tmp_name(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            if not os.path.lexists(out):
                os.rename(old, out)
        raise
    with contextlib.suppress(OSError):  # the new output is in place: a failure here leaves only a leftover
        dead = _tmp_name(out)
        os.rename(old, dead)
        _remove(dead)


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


def refuse_link(path: str | Path, what: str = "upstack writes this file") -> None:
    """One line (LinkRefusedError) when `path` is a symbolic link: a file upstack writes is never written
    through a link planted in its place."""
    if Path(path).is_symlink():
        raise LinkRefusedError(f"{path} is a symbolic link; {what} and does not write through links (remove it, "
                               f"or choose another output)")


def write_file(path: str | Path, data: str | bytes) -> Path:
    """Write a whole file into an existing folder without following what is planted there: a symbolic link
    at `path` is refused (one line); the content goes into a new temporary sibling (O_EXCL | O_NOFOLLOW)
    that is renamed over `path`, so neither a link's target nor the other names of a hard link are written.
    Text is UTF-8. No lock: for files inside a folder whose writer holds its lock (a run folder)."""
    path = Path(path)
    refuse_link(path)
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(e) and not isinstance(e, UpstackError):
            raise disk_full_error(path) from None
        raise
    return path


def open_nofollow(path: str | Path, mode: str = "w"):
    """open() (UTF-8 text) of a file written in place, such as an append log, that refuses a symbolic link at
    `path` in one line instead of writing through it."""
    def opener(p, flags):
        try:
            return os.open(p, flags | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                refuse_link(path)
            raise

    return open(path, mode, encoding="utf-8", opener=opener)


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
