"""Skip-if-done: a stage is done when its folder's marker records the fingerprint of its config and inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from upstack.pipeline.recipe import Recipe, Stage
from upstack.report import MARKER


def _fingerprint_path(p: Path) -> str:
    """Stage outputs are identified by their marker; other inputs by size and mtime of their files."""
    marker = p / MARKER if p.is_dir() else None
    if marker and marker.is_file():
        return json.loads(marker.read_text()).get("fingerprint", "")
    if p.is_file():
        st = p.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]
    return "missing"


def stage_fingerprint(st: Stage, recipe: Recipe) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"type": st.type, "config": st.resolved}, sort_keys=True, default=str).encode())
    for dep in st.deps:
        dep_folder = recipe.stages[dep].folder
        h.update(f"{dep}={_fingerprint_path(dep_folder)}".encode())
    return h.hexdigest()[:24]


def stage_done(st: Stage, recipe: Recipe) -> bool:
    marker = st.folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == stage_fingerprint(st, recipe)
    except (OSError, json.JSONDecodeError):
        return False
