"""Loading a recipe: YAML -> profile overlay -> stages in dependency order, each with its resolved options.

Everything that can be checked before a stage runs is checked here and reported together, each problem
with its line in the recipe: unknown keys, unknown stage types, wrong types, missing inputs, cycles, and
each stage's own value checks (`StageType.check`).
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import logging
import os
import re
from pathlib import Path
from typing import Any

import yaml

from upstack.config import config_errors, config_from_dict
from upstack.data.spec import parse_data_spec
from upstack.errors import ConfigError, UpstackError
from upstack.hub import hub_offline
from upstack.pipeline.stages import STAGE_TYPES, field_names, load_ref
from upstack.pipeline.variables import apply_var_sets, substitute_vars

log = logging.getLogger(__name__)

BUILTIN_RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TOP_LEVEL_KEYS = {"name", "description", "vars", "stages", "evaluate", "report", "profiles", "launch"}


@dataclasses.dataclass
class Stage:
    name: str
    type: str
    options: dict                        # as written in the recipe
    line: int | None
    deps: list[str] = dataclasses.field(default_factory=list)
    resolved: dict = dataclasses.field(default_factory=dict)  # options with references resolved + outputs
    folder: Path | None = None


@dataclasses.dataclass
class Recipe:
    name: str
    path: Path
    run_dir: Path
    stages: dict[str, Stage]             # in execution (topological) order
    raw: dict
    # Input files and folders that neither exist nor are made by a stage (loaded with missing_ok: a dry
    # run plans the recipe and lists them as what must exist before the real run, which refuses them).
    missing: list[str] = dataclasses.field(default_factory=list)


class MissingInput(str):
    """A problem that is only an absent input file or folder (no stage makes it): the one kind of problem
    a dry run plans around."""


# --------------------------------------------------------------------------------------------------
# YAML and line numbers
# --------------------------------------------------------------------------------------------------

# An alias may be used many times (`<<: *defaults` in every stage), but aliases of aliases multiply: nine
# levels of nine copies is 387 million values from 400 bytes ("billion laughs"). PyYAML shares the nodes,
# so loading is instant; every walk over the options after it is not. A recipe is a few hundred values.
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 100


def _check_yaml_graph(root: yaml.Node, path: Path) -> None:
    """Refuse a node graph that expands past MAX_YAML_VALUES values, nests deeper than MAX_YAML_DEPTH or
    contains itself, counting each shared node once per use without expanding it (iterative: no recursion)."""
    size: dict[int, int] = {}
    open_ids: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        key = id(node)
        children = ([x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            open_ids.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            if size[key] > MAX_YAML_VALUES:
                raise ConfigError(f"{path}: its aliases expand to more than {MAX_YAML_VALUES:,} values (an alias "
                                  f"bomb?); write the options out or use fewer nested aliases")
            continue
        if key in size:
            continue
        if key in open_ids:
            raise ConfigError(f"{path} line {node.start_mark.line + 1}: an alias refers to itself (a value "
                              f"that contains itself)")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{path} line {node.start_mark.line + 1}: values nest deeper than "
                              f"{MAX_YAML_DEPTH} levels")
        open_ids.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in size)


def _yaml_lines(root: yaml.Node | None) -> dict[tuple, int]:
    """Map key paths ('stages', 'upscale', 'm') to 1-based line numbers, for error messages.
    `root` has passed `_check_yaml_graph`, so the walk is bounded."""
    lines: dict[tuple, int] = {}

    def walk(node, path):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = path + (k.value,)
                lines[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


def _read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """(the recipe's value, its line numbers). ConfigError for unreadable or invalid YAML and for alias
    bombs, self-references and deep nesting (checked on the shared node graph, before anything expands)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_yaml_graph(node, path)
        return loader.construct_document(node) if node is not None else None, _yaml_lines(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:  # the composer recurses once per level of nesting
        raise ConfigError(f"{path}: values nest deeper than {MAX_YAML_DEPTH} levels") from None
    finally:
        loader.dispose()


def _type_error_line(err: str, sname: str, default: int | None, lines: dict) -> int | None:
    """The line of the option a `config_errors` message names ("stage 'up'.m: ..."), else the stage's."""
    head = err.split(":")[0]
    key = head.split(".")[-1] if "." in head else None
    return lines.get(("stages", sname, key), default) if key else default


def _problem_line(problem: str, st: Stage, lines: dict) -> int | None:
    """The line of the option a check's message names: by its leading path ('learning_rate: ...',
    'base.train.max_steps: ...', 'models[1] (x): ...'), else an option named as a word in it, else the stage's."""
    own = ("stages", st.name)
    head = problem.split(": ", 1)[0] if ": " in problem else ""
    keys = [int(k) if k.isdigit() else k for k in re.split(r"[.\[\] ]+", head) if k]
    for i in range(len(keys)):
        for j in range(len(keys), i, -1):
            if own + tuple(keys[i:j]) in lines:
                return lines[own + tuple(keys[i:j])]
    for key in st.options:
        if own + (key,) in lines and re.search(rf"\b{re.escape(key)}\b", problem):
            return lines[own + (key,)]
    return st.line


# --------------------------------------------------------------------------------------------------
# References between stages
# --------------------------------------------------------------------------------------------------

def _split_named(value: str) -> tuple[str, str]:
    """'NAME=PATH' (benchmark options) -> ('NAME=', 'PATH'); anything else -> ('', value)."""
    name, sep, rest = value.partition("=")
    if sep and name and "/" not in name and rest:
        return name + sep, rest
    return "", value


def _refs(value: Any, names: set[str]) -> set[str]:
    if isinstance(value, str):
        value = _split_named(value)[1]
        head = value.split("/", 1)[0]
        return {head} if head in names and (value == head or "/" in value) else set()
    if isinstance(value, list):
        return set().union(*(_refs(v, names) for v in value)) if value else set()
    if isinstance(value, dict):
        return set().union(*(_refs(v, names) for v in value.values())) if value else set()
    return set()


def _resolve(value: Any, folders: dict[str, Path]) -> Any:
    if isinstance(value, str):
        label, path = _split_named(value)
        head, _, rest = path.partition("/")
        if head in folders:
            return label + (str(folders[head] / rest) if rest else str(folders[head]))
        return value
    if isinstance(value, list):
        return [_resolve(v, folders) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, folders) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------
# Recipe structure
# --------------------------------------------------------------------------------------------------

def _expand_evaluate(raw: dict, stages: dict, errors: list[str], lines: dict) -> None:
    """`evaluate:` (a block or a list of blocks) -> one eval stage per model: <block name>_<model>."""
    blocks = raw.get("evaluate")
    if blocks is None:
        return
    blocks = blocks if isinstance(blocks, list) else [blocks]
    for k, ev in enumerate(blocks):
        line = lines.get(("evaluate", k) if isinstance(raw.get("evaluate"), list) else ("evaluate",), "?")
        if not isinstance(ev, dict) or not isinstance(ev.get("models"), list):
            errors.append(f"line {line}: evaluate: each block needs a 'models' list and eval options")
            continue
        prefix = ev.get("name", "eval")
        opts = {key: v for key, v in ev.items() if key not in ("models", "name")}
        for model in ev["models"]:
            # a model named by path or Hub id: its last part; a .gguf file: its import stage's name
            # (`eval_import_SmolLM2-135M-Instruct.Q4_1`), so the report finds the model the stage scored
            label = model
            if isinstance(model, str) and "/" in model or _is_gguf(model):
                last = model.rstrip("/").rsplit("/", 1)[-1]
                label = ("import_" + last[:-len(".gguf")]) if _is_gguf(model) else last
                label = re.sub(r"[^A-Za-z0-9_.-]", "_", label)
            name = f"{prefix}_{label}"
            if name in stages:
                errors.append(f"line {line}: evaluate: stage {name!r} is defined twice")
                continue
            stages[name] = {"type": "eval", "model": model, **opts, "_line": line}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _apply_profile(raw: dict, profile: str | None, path: Path) -> dict:
    """The recipe with `profiles: {NAME: {stages: {...}, evaluate: ...}}` overlaid (as is without a profile)."""
    if profile is None:
        return raw
    profiles = raw.get("profiles") or {}
    if profile not in profiles:
        raise ConfigError(f"{path}: no profile {profile!r} (profiles: {', '.join(profiles) or 'none'})")
    return _deep_merge(raw, profiles[profile])


# --------------------------------------------------------------------------------------------------
# --set STAGE.KEY=VALUE: one option from the command line
# --------------------------------------------------------------------------------------------------

SET_EXAMPLE = "--set sft.max_steps=10, --set base.train.max_steps=5, --set pretrain.data=[a.jsonl]"
# Options that hold a mapping of another config's options: --set checks the nested key against it too.
NESTED_OPTIONS = {("base", "train"): "upstack.train.pretrain:PretrainConfig"}


def _yaml_value(text: str, where: str) -> Any:
    """A --set value read as a YAML scalar or flow value ('10' -> 10, 'true' -> True, '[a, b]' -> a list),
    with the recipe file's guards against alias bombs and deep nesting."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_graph(node, Path(where))
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: the value is not valid YAML ({getattr(e, 'problem', e)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: the value nests deeper than {MAX_YAML_DEPTH} levels") from None
    finally:
        loader.dispose()


def _close(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _apply_sets(stages_raw: dict, sets: list[str], lines: dict, errors: list[str]) -> None:
    """Apply each `STAGE.KEY[.SUB...]=VALUE` to the stages' options (after the profile, and after `evaluate:`
    blocks became eval stages, so `--set eval_dpo.limit=5` works). An unknown stage or option is a problem
    with a "did you mean"; the key's line becomes "--set ..." so that every later check of the value (types,
    the stage's own value checks, missing inputs) names the command-line option instead of a recipe line."""
    for item in sets:
        where = f"--set {item}"
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            errors.append(f"{where}: expected STAGE.KEY=VALUE (e.g. {SET_EXAMPLE})")
            continue
        # the longest stage name the key starts with (a stage name may itself contain dots)
        cut = next((i for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in stages_raw), None)
        if cut is None:
            hint = _close(parts[0], stages_raw) or f" (stages: {', '.join(stages_raw)})"
            errors.append(f"{where}: no stage {parts[0]!r}{hint}")
            continue
        sname, path = ".".join(parts[:cut]), parts[cut:]
        opts = stages_raw[sname]
        if not isinstance(opts, dict):
            continue  # reported by _parse_stages
        stype = opts.get("type", sname)
        if stype in STAGE_TYPES and path[0] != "type":
            try:
                known = field_names(load_ref(STAGE_TYPES[stype].config))
            except ImportError:
                known = None  # reported by _prepare_stage
            if known is not None and path[0] not in known:
                errors.append(f"{where}: stage {sname!r} ({stype}) has no option {path[0]!r}"
                              f"{_close(path[0], sorted(known))}")
                continue
            nested = NESTED_OPTIONS.get((stype, path[0]))
            if nested and len(path) > 1 and path[1] not in field_names(load_ref(nested)):
                errors.append(f"{where}: stage {sname!r} ({stype}): {path[0]} has no option {path[1]!r}"
                              f"{_close(path[1], sorted(field_names(load_ref(nested))))}")
                continue
        try:
            value = _yaml_value(text, where)
        except ConfigError as e:
            errors.append(str(e))
            continue
        opts = stages_raw[sname] = dict(opts)
        target, ok = opts, True
        for i, k in enumerate(path[:-1]):
            inner = target.get(k)
            if inner is None:
                inner = {}
            elif not isinstance(inner, dict):
                errors.append(f"{where}: {sname}.{'.'.join(path[:i + 1])} is a {type(inner).__name__}, not a "
                              f"mapping of options; set the whole value (--set {sname}.{'.'.join(path[:i + 1])}=...)")
                ok = False
                break
            target[k] = inner = dict(inner)
            target = inner
        if not ok:
            continue
        target[path[-1]] = value
        lines[("stages", sname, *path)] = where


def _is_gguf(value) -> bool:
    return isinstance(value, str) and value.lower().endswith(".gguf")


def _add_gguf_imports(stages_raw: dict, lines: dict) -> None:
    """A model input naming a .gguf file becomes the output of an `import` stage, `import_<file stem>`, which
    imports it once into the run folder (one stage per file; its marker skips it on a re-run)."""
    made: dict[str, str] = {}  # gguf path -> import stage
    for sname, opts in list(stages_raw.items()):
        if not isinstance(opts, dict) or opts.get("type", sname) == "import":
            continue
        for key in MODEL_KEYS:
            value = opts.get(key)
            items = value if isinstance(value, list) else [value]
            paths = [(v.get("model") if isinstance(v, dict) else v) for v in items]
            if not any(_is_gguf(p) for p in paths):
                continue
            for path in filter(_is_gguf, paths):
                if path not in made:
                    name = "import_" + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).name[:-len(".gguf")])
                    while name in stages_raw:
                        name += "_"
                    made[path] = name
                    line = lines.get(("stages", sname, key), lines.get(("stages", sname)))
                    stages_raw[name] = {"type": "import", "source": path, "_line": line}
            swap = [({**v, "model": made[v["model"]]} if isinstance(v, dict) and _is_gguf(v.get("model"))
                     else made[v] if _is_gguf(v) else v) for v in items]
            stages_raw[sname] = opts = {**opts, key: swap if isinstance(value, list) else swap[0]}


def _parse_stages(stages_raw: dict, lines: dict, errors: list[str]) -> dict[str, Stage]:
    """Stage name -> Stage with its type, written options and dependencies (no resolution yet)."""
    names = set(stages_raw)
    stages: dict[str, Stage] = {}
    for sname, opts in stages_raw.items():
        line = lines.get(("stages", sname))
        if isinstance(opts, dict) and "_line" in opts:
            line = opts.pop("_line")
        if not isinstance(opts, dict):
            errors.append(f"line {line}: stage {sname!r}: options must be a mapping")
            continue
        stype = opts.get("type", sname)
        if stype not in STAGE_TYPES:
            errors.append(f"line {line}: stage {sname!r}: unknown type {stype!r} "
                          f"(known: {', '.join(sorted(STAGE_TYPES))}; set 'type:' when the name is not a type)")
            continue
        if "/" in sname or sname.startswith("."):
            errors.append(f"line {line}: stage name {sname!r} may not contain '/' or start with '.'")
        options = {k: v for k, v in opts.items() if k != "type"}
        deps = sorted(_refs(options, names - {sname}))
        if sname in _refs(options, {sname}):
            errors.append(f"line {line}: stage {sname!r} refers to its own output")
        stages[sname] = Stage(sname, stype, options, line, deps)
    return stages


def _toposort(stages: dict[str, Stage], errors: list[str]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(n: str, chain: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cyc = chain[chain.index(n):] + [n]
            msg = f"line {stages[n].line}: stages form a cycle: {' -> '.join(cyc)}"
            if msg not in errors:
                errors.append(msg)
            return
        state[n] = 1
        for d in stages[n].deps:
            if d in stages:
                visit(d, chain + [n])
        state[n] = 2
        order.append(n)

    for n in stages:  # written order, dependencies first
        visit(n, [])
    return order


# --------------------------------------------------------------------------------------------------
# One stage's options: resolve, type-check, value-check, inputs
# --------------------------------------------------------------------------------------------------

def _prepare_stage(st: Stage, folders: dict[str, Path], stages: dict[str, Stage], lines: dict,
                   errors: list[str]) -> None:
    """Fill `st.folder` and `st.resolved` (references -> folders, output and pipeline options); add problems."""
    st.folder = folders[st.name]
    stype = STAGE_TYPES[st.type]
    resolved = _resolve(st.options, {k: v for k, v in folders.items() if k in st.deps})
    out_value = str(st.folder / stype.output_file) if stype.output_file else str(st.folder)
    for key in [stype.output_field, *stype.pipeline_fields]:
        if key in st.options:
            errors.append(f"line {lines.get(('stages', st.name, key), st.line)}: stage {st.name!r}: option "
                          f"{key!r} is set by the pipeline; remove it")
    resolved[stype.output_field] = out_value
    try:
        cls = load_ref(stype.config)
    except ImportError as e:
        errors.append(f"line {st.line}: stage {st.name!r}: stage type {st.type!r} is unavailable ({e})")
        return
    resolved.update({k: v for k, v in stype.pipeline_fields.items() if k in field_names(cls)})
    type_errors = config_errors(cls, resolved, where=f"stage {st.name!r}")
    for err in type_errors:
        errors.append(f"line {_type_error_line(err, st.name, st.line, lines)}: {err}")
    if not type_errors:
        errors.extend(_value_errors(st, cls, resolved, lines))
    warnings: list[tuple[str, str]] = []
    for key, err in _input_errors(st, stages, warnings):
        line = f"line {lines.get(('stages', st.name, key), st.line)}: stage {st.name!r}: {err}"
        errors.append(MissingInput(line) if isinstance(err, MissingInput) else line)
    for key, w in warnings:
        log.warning("warning: line %s: stage %r: %s", lines.get(("stages", st.name, key), st.line), st.name, w)
    st.resolved = resolved


def _value_errors(st: Stage, cls: type, resolved: dict, lines: dict) -> list[str]:
    """The stage type's own check of its values (no files), each problem with the line of its option."""
    check = STAGE_TYPES[st.type].check
    if check is None:
        return []
    cfg = config_from_dict(cls, resolved, where=f"stage {st.name!r}")
    try:
        load_ref(check)(cfg)
    except UpstackError as e:
        return [f"line {_problem_line(p, st, lines)}: stage {st.name!r}: {p}" for p in str(e).split("; ")]
    return []


MODEL_KEYS = ("model", "source", "reference", "base", "models", "ref_model", "preference_reference", "adapter")
DATA_KEYS = ("data", "eval_data", "perplexity", "preference", "against", "benchmarks", "seed_data", "calibration")
FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".csv", ".tsv", ".parquet", ".gz", ".yaml", ".yml")


def _did_you_mean(name: str, stages: dict) -> str:
    close = difflib.get_close_matches(name, list(stages), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _model_errors(key: str, v: str, stages: dict, warnings: list[str]) -> list[str]:
    """A model input is a stage, an existing folder, or a hub id: a bare word that is neither a stage nor a
    folder is most likely a misspelled stage (an error offline, a warning online, where it may be a hub id)."""
    if v.split("/", 1)[0] in stages:
        return []
    if _is_gguf(v):
        return [] if Path(v).expanduser().is_file() else [f"input {key}={v!r}: no such file (a GGUF model source)"]
    if v.startswith((".", "/", "~")) or os.path.exists(v):
        return [] if Path(v).expanduser().exists() else [
            MissingInput(f"input {key}={v!r} does not exist and no stage makes it" + _did_you_mean(v, stages))]
    if "/" not in v:
        msg = f"input {key}={v!r} is no stage of this recipe and no existing folder{_did_you_mean(v, stages)}"
        if hub_offline():
            return [msg]
        warnings.append(msg + "; trying it as a Hugging Face Hub id")
    return []


def _data_paths(value) -> list[str]:
    """The file paths a data option names: spec strings (PATH[:options]), {path: ...} mappings, NAME=PATH."""
    out = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):
            item = item.get("path")
        if not isinstance(item, str):
            continue
        path = _split_named(item)[1]
        try:
            path = parse_data_spec(path).path
        except UpstackError:
            pass  # the stage's own check reports a bad spec
        out.append(path)
    return out


def _data_errors(key: str, path: str, stages: dict) -> list[str]:
    """A local data file must exist (or be made by a stage); hub dataset ids (org/name) are left to the stage."""
    if path.split("/", 1)[0] in stages:
        return []
    local = path.startswith((".", "/", "~")) or path.endswith(FILE_SUFFIXES) or os.path.exists(path)
    if not local:
        return []
    expanded = str(Path(path).expanduser())
    if any(ch in path for ch in "*?["):
        return [] if glob.glob(expanded) else [MissingInput(f"{key}: no file matches {path!r}")]
    return [] if Path(expanded).exists() else [MissingInput(f"{key}: {path!r} does not exist and no stage makes it"
                                                            + _did_you_mean(path.split("/", 1)[0], stages))]


def _input_errors(st: Stage, stages: dict, warnings: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """(option, problem) for inputs that are neither made by a stage nor present: model folders, data files,
    benchmark files; and a model input taken from a stage that writes only an adapter."""
    warnings = [] if warnings is None else warnings
    errors: list[tuple[str, str]] = []
    for key in MODEL_KEYS:
        value = st.options.get(key)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, dict):
                v = v.get("model")
            if not isinstance(v, str):
                continue
            found: list[str] = []
            errors += [(key, e) for e in _model_errors(key, v, stages, found)]
            warnings += [(key, w) for w in found]
            producer = stages.get(v)
            if producer is not None and producer.options.get("adapter_only") and key != "adapter":
                errors.append((key, f"input {key}={v!r}: stage {v!r} writes only an adapter (adapter_only: true), "
                                    f"not a model; drop adapter_only, or merge it first (a merge-adapter stage "
                                    f"with adapter: {v}/adapter)"))
    for key in DATA_KEYS:
        for path in _data_paths(st.options.get(key)):
            errors += [(key, e) for e in _data_errors(key, path, stages)]
    return errors


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------

def _recipe_name(value: Any, path: Path, lines: dict) -> str:
    """The recipe's `name`: a folder name (the default run folder is runs/<name>), never a path."""
    line = lines.get(("name",))
    where = f"{path} line {line}" if line else str(path)
    if value is None or value == "":
        value = path.stem
    if not isinstance(value, str):
        kinds = {dict: "a mapping", list: "a list", bool: "true/false", int: "a number", float: "a number"}
        kind = kinds.get(type(value), f"a {type(value).__name__}")
        raise ConfigError(f"{where}: name must be text (a folder name under runs/), not {kind}: {value!r}"
                          if len(repr(value)) < 60 else f"{where}: name must be text (a folder name), not {kind}")
    if value in (".", "..") or any(c in value for c in "/\\\0") or os.path.isabs(value):
        raise ConfigError(f"{where}: name {value!r} is a name, not a path (no '/', '\\', '.' or '..'); choose "
                          f"the run folder with --out")
    return value


def builtin_recipe_path(path: str | Path) -> Path:
    """`path` itself when it exists; else, for `NAME`, `NAME.yaml` or `recipes/NAME.yaml`, the recipe of that
    name shipped in the package (so `upstack run recipes/tiny-solar.yaml` works from any folder)."""
    path = Path(path)
    if path.exists() or len(path.parts) > 2 or (len(path.parts) == 2 and path.parts[0] != "recipes"):
        return path
    builtin = BUILTIN_RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return builtin if builtin.is_file() else path


def load_recipe(path: str | Path, run_dir: str | Path | None = None, profile: str | None = None,
                sets: list[str] | None = None, missing_ok: bool = False) -> Recipe:
    """Parse and validate a whole recipe; raise one ConfigError listing every problem with its line.

    `profile` applies the recipe's `profiles: {NAME: {stages: {...}, evaluate: {...}}}` overlay first.
    Every stage's config is built and value-checked here, so a bad value in the last stage fails before
    the first stage runs. `sets` (`upstack run --set STAGE.KEY=VALUE`) override single options after the
    profile, with the same checks as the file. With `missing_ok` (a dry run), input files and folders that
    do not exist yet are no error when nothing else is wrong: they are listed in `Recipe.missing`.
    """
    path = builtin_recipe_path(path)
    raw, lines = _read_yaml(path)
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with 'name' and 'stages'")
    for key in sorted(set(raw) - TOP_LEVEL_KEYS):
        errors.append(f"line {lines.get((key,), '?')}: unknown top-level key {key!r} "
                      f"(known: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    raw = _apply_profile(raw, profile, path)
    sets = apply_var_sets(raw, list(sets or []), errors, _yaml_value)
    raw = substitute_vars(raw, errors, lines)
    name = _recipe_name(raw.get("name"), path, lines)
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{path}: 'stages' must be a non-empty mapping of stage name -> options")
    stages_raw = dict(stages_raw)
    _expand_evaluate(raw, stages_raw, errors, lines)
    if sets:
        _apply_sets(stages_raw, sets, lines, errors)
    _add_gguf_imports(stages_raw, lines)
    stages = _parse_stages(stages_raw, lines, errors)
    order = _toposort(stages, errors)
    run_dir = Path(run_dir) if run_dir else Path("runs") / name
    folders = {s: run_dir / s for s in stages}
    for sname in order:
        _prepare_stage(stages[sname], folders, stages, lines, errors)
    # a problem with a --set value has "line --set ...": it names the option, not a line
    listed = [e[len("line "):] if e.startswith("line --set ") else str(e) for e in errors]
    if errors and not (missing_ok and all(isinstance(e, MissingInput) for e in errors)):
        raise ConfigError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(listed))
    return Recipe(name, path, run_dir, {s: stages[s] for s in order}, raw, missing=listed)
