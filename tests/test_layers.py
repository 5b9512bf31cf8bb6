"""The package's import structure: layers point down, stages do not import each other, no cycles.

Every import counts, function-local ones too (they hide cycles rather than remove them). The order is
the one docs/architecture.md describes; change both together.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "upstack"

# Lowest first. A module may import modules of its own layer or of lower layers only.
LAYERS: list[tuple[str, ...]] = [
    ("upstack", "upstack.errors", "upstack.config", "upstack.arch", "upstack.outputs", "upstack.hub"),
    ("upstack.checkpoint",),
    ("upstack.lm",),
    ("upstack.data",),
    ("upstack.seam",),
    ("upstack.upscale", "upstack.gguf", "upstack.merge", "upstack.train", "upstack.evaluate", "upstack.base"),
    ("upstack.pipeline", "upstack.report", "upstack.report_plots"),
    ("upstack.commands",),
    ("upstack.cli", "upstack.__main__"),
]
STAGES = LAYERS[5]
# The one stage-to-stage edge the design allows: building a base model is a pretraining run.
ALLOWED_STAGE_EDGES = {("upstack.base", "upstack.train")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project's modules this file imports, anywhere in it."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def add(mod: str) -> None:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod:
            found.add(mod)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "upstack" or a.name.startswith("upstack."):
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod != "upstack" and not mod.startswith("upstack."):
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{mod}.{a.name}"
                add(sub if sub in known else mod)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _group(mod: str) -> tuple[int, str]:
    """(layer index, the layer entry the module belongs to)."""
    best = None
    for i, layer in enumerate(LAYERS):
        for entry in layer:
            if mod == entry or (entry != "upstack" and mod.startswith(entry + ".")):  # the root is only itself
                if best is None or len(entry) > len(best[1]):
                    best = (i, entry)
    assert best is not None, f"{mod} is in no layer: add it to LAYERS and docs/architecture.md"
    return best


def test_every_module_has_a_layer():
    for mod in _modules():
        _group(mod)


def test_imports_point_down_and_stages_stay_apart():
    bad = []
    for mod, deps in sorted(_graph().items()):
        lm, gm = _group(mod)
        for dep in sorted(deps):
            ld, gd = _group(dep)
            if ld > lm:
                bad.append(f"{mod} (layer {lm}) imports {dep} (layer {ld}, higher)")
            elif gd != gm and gm in STAGES and gd in STAGES and (gm, gd) not in ALLOWED_STAGE_EDGES:
                bad.append(f"stage {gm} imports stage {gd} ({mod} -> {dep})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    """The walker must find imports hidden in functions, or the tests above could not fail."""
    pkg = tmp_path / "upstack"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from upstack.sub import b\n    from . import c\n")
    (pkg / "sub" / "b.py").write_text("")
    (pkg / "sub" / "c.py").write_text("")
    known = {"upstack", "upstack.sub", "upstack.sub.a", "upstack.sub.b", "upstack.sub.c"}
    global SRC
    old = SRC
    SRC = tmp_path
    try:
        assert _imports("upstack.sub.a", pkg / "sub" / "a.py", known) == {"upstack.sub.b", "upstack.sub.c"}
    finally:
        SRC = old
