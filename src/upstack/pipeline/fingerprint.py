"""Skip-if-done: a stage is done when its folder's marker records the fingerprint of its config and inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from upstack.checkpoint import open_adapter
from upstack.errors import UpstackError
from upstack.lm import check_model_path
from upstack.outputs import file_identity
from upstack.pipeline.recipe import MODEL_KEYS, Recipe, Stage
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


def _local_paths(value) -> list[Path]:
    """The existing files and folders an option value names: paths, data specs ("file.jsonl:format=..."),
    mappings with a path, lists of those."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _local_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _local_paths(v)]
    if not isinstance(value, str) or not value or "\n" in value:
        return []
    for candidate in (value, value.split(":", 1)[0]):
        try:
            p = Path(candidate).expanduser()
            if p.exists():
                return [p]
        except (OSError, ValueError):
            continue
    return []


def input_files(st: Stage, recipe: Recipe) -> dict[str, str]:
    """The identity of every local file or folder a stage's options name outside the run folder (data files,
    a local base model, benchmark files); what is inside the run folder is another stage's output, known
    by its marker."""
    run_dir = recipe.run_dir.resolve()
    found = {}
    for p in _local_paths(st.resolved):
        r = p.resolve()
        if r == run_dir or run_dir in r.parents:
            continue
        found[str(p)] = file_identity(p)
    return found


def _outside(p: Path, run_dir: Path) -> bool:
    r = p.resolve()
    return r != run_dir and run_dir not in r.parents


def check_model_inputs(st: Stage, recipe: Recipe) -> None:
    """The checkpoint gate (lm.check_model_path; open_adapter for an adapter) for every local model folder a
    stage names outside the run folder, before its files are read for the fingerprint: `model: /` is one
    line at once, not a walk of the whole file system. Hub ids and earlier stages' outputs are left to
    the stage itself."""
    run_dir = recipe.run_dir.resolve()
    allow_pickle = bool(st.resolved.get("allow_pickle"))
    for key in MODEL_KEYS:
        value = st.resolved.get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, dict):
                v = v.get("model")
            if not isinstance(v, str) or not v or not Path(v).expanduser().exists():
                continue
            p = Path(v).expanduser()
            if not _outside(p, run_dir):
                continue
            if st.type == "import" and p.is_file():  # a GGUF file: `upstack import` checks it before reading
                continue
            if key == "adapter":
                open_adapter(p)
            else:
                check_model_path(str(p), f"stage {st.name!r}: {key}", allow_pickle=allow_pickle)


def stage_fingerprint(st: Stage, recipe: Recipe) -> str:
    """A hash of the stage's type and resolved options, its input stages' fingerprints and the content
    identity of the files it reads: a changed data file re-runs the stage. Model folders pass the
    checkpoint gate first (check_model_inputs)."""
    check_model_inputs(st, recipe)
    h = hashlib.sha256()
    h.update(json.dumps({"type": st.type, "config": st.resolved}, sort_keys=True, default=str).encode())
    for dep in st.deps:
        dep_folder = recipe.stages[dep].folder
        h.update(f"{dep}={_fingerprint_path(dep_folder)}".encode())
    h.update(json.dumps(input_files(st, recipe), sort_keys=True).encode())
    return h.hexdigest()[:24]


def stage_done(st: Stage, recipe: Recipe) -> bool:
    marker = st.folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == stage_fingerprint(st, recipe)
    except (OSError, json.JSONDecodeError, UpstackError):  # an input the gate refuses: the stage runs, and says so
        return False
