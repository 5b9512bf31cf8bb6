"""Writing outputs so that nothing half-written ever looks finished.

Every command writes a folder or a file into a temporary sibling and renames it into place only when
it is complete; an existing output is refused unless the user passed --overwrite. These are the one
implementation of both rules.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from upstack.errors import OutputExistsError


def check_output_free(out: str | Path, overwrite: bool) -> None:
    """Refuse an existing output unless --overwrite was given."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder of `out`; rename it to `out` only when the block succeeds.

    On any failure (exception, Ctrl-C, disk full) the temporary folder is removed, so `out` never
    appears half-written. An existing `out` is refused unless `overwrite`, and then replaced only
    after the new one is complete.
    """
    out = Path(out)
    check_output_free(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary sibling path of `path`; the caller writes it, and it replaces `path` only when
    the block succeeds (removed on any failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write a whole text file (UTF-8) atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
