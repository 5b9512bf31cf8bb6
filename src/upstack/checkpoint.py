"""Hugging Face checkpoint folders: atomic output folders (more to come: reader, plan, writer, verify)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from upstack.errors import OutputExistsError


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder of `out`; rename it to `out` only when the block succeeds.

    On any failure (exception, Ctrl-C, disk full) the temporary folder is removed, so `out` never
    appears half-written. An existing `out` is refused unless `overwrite`, and then replaced only
    after the new one is complete.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (pass --overwrite to replace it)")
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
