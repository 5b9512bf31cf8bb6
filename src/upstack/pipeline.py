"""Recipes: a YAML file of named stages -> validated plan -> stages run in order, skip-if-done, report.

A recipe:

    name: tiny-solar                 # run folder: runs/<name>/ (or --out DIR)
    stages:
      data:    {type: synth-data, scale: quick}
      base:    {type: base, tokenizer: data/tokenizer, data: [data/pretrain.jsonl], max_steps: 300}
      upscale: {source: base, m: 2}  # type defaults to the stage name when that is a stage type
      ...
    evaluate:                        # optional: one eval stage per listed model (eval_<model>)
      models: [base, upscale]
      tasks: gsm8k_local

Any string option equal to a stage name, or starting with `<stage>/`, refers to that stage's output
folder (and makes the stage depend on it); so does the PATH of a `NAME=PATH` option (benchmarks). The
pipeline fills each stage's output option (`out`, or `output` for eval) with runs/<name>/<stage>/ and
builds the stage's own typed config from the options, exactly as the CLI does. Stages know nothing of
recipes.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from upstack.config import config_errors, config_from_dict, config_to_dict
from upstack.errors import ConfigError, UpstackError
from upstack.outputs import write_text_atomic

MARKER = "upstack_stage.json"


@dataclasses.dataclass(frozen=True)
class StageType:
    target: str                          # "module:function" taking the config
    config: str                          # "module:ConfigClass"
    output_field: str = "out"            # option the pipeline fills with the stage folder
    output_file: str | None = None       # when set, the option gets <stage folder>/<output_file>
    checkpoint: bool = False             # writes a model checkpoint into the stage folder
    pipeline_fields: dict = dataclasses.field(default_factory=dict)  # options the pipeline sets


STAGE_TYPES: dict[str, StageType] = {
    "synth-data": StageType("upstack.data.synthetic:run_synth_data", "upstack.data.synthetic:SynthDataConfig",
                            pipeline_fields={"overwrite": True}),
    "synth-math": StageType("upstack.data.synth_math:run_synth_math", "upstack.data.synth_math:SynthMathConfig",
                            pipeline_fields={"overwrite": True}),
    "base": StageType("upstack.base:build_base", "upstack.base:BaseConfig", checkpoint=True,
                      pipeline_fields={"overwrite": True}),
    "upscale": StageType("upstack.upscale:upscale", "upstack.upscale:UpscaleConfig", checkpoint=True,
                         pipeline_fields={"overwrite": True, "quiet": True}),
    "pretrain": StageType("upstack.train.pretrain:pretrain", "upstack.train.pretrain:PretrainConfig",
                          checkpoint=True, pipeline_fields={"overwrite": True, "resume": True}),
    "sft": StageType("upstack.train.sft:sft", "upstack.train.sft:SFTConfig", checkpoint=True,
                     pipeline_fields={"overwrite": True, "resume": True}),
    "dpo": StageType("upstack.train.dpo:dpo", "upstack.train.dpo:DPOConfig", checkpoint=True,
                     pipeline_fields={"overwrite": True, "resume": True}),
    "merge": StageType("upstack.merge:merge", "upstack.merge:MergeConfig", checkpoint=True,
                       pipeline_fields={"overwrite": True}),
    "eval": StageType("upstack.evaluate.harness:evaluate", "upstack.evaluate.harness:EvalConfig",
                      output_field="output", output_file="results.json"),
    "contamination": StageType("upstack.evaluate.contamination:contamination",
                               "upstack.evaluate.contamination:ContaminationConfig",
                               output_field="output", output_file="contamination.json"),
    "decontaminate": StageType("upstack.data.decontaminate:decontaminate",
                               "upstack.data.decontaminate:DecontaminateConfig",
                               output_file="clean.jsonl", pipeline_fields={"overwrite": True}),
}


def _load(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------------------------------
# Loading and validating a recipe
# --------------------------------------------------------------------------------------------------

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


def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map key paths ('stages', 'upscale', 'm') to 1-based line numbers, for error messages."""
    import yaml

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

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


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
            name = f"{prefix}_{model}"
            if name in stages:
                errors.append(f"line {line}: evaluate: stage {name!r} is defined twice")
                continue
            stages[name] = {"type": "eval", "model": model, **opts, "_line": line}


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


BUILTIN_RECIPES = Path(__file__).resolve().parent / "recipes"


def builtin_recipe_path(path: str | Path) -> Path:
    """`path` itself when it exists; else, for `NAME`, `NAME.yaml` or `recipes/NAME.yaml`, the recipe of that
    name shipped in the package (so `upstack run recipes/tiny-solar.yaml` works from any folder)."""
    path = Path(path)
    if path.exists() or len(path.parts) > 2 or (len(path.parts) == 2 and path.parts[0] != "recipes"):
        return path
    builtin = BUILTIN_RECIPES / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return builtin if builtin.is_file() else path


def load_recipe(path: str | Path, run_dir: str | Path | None = None, profile: str | None = None) -> Recipe:
    """Parse and validate a whole recipe; raise one ConfigError listing every problem with its line.

    `profile` applies the recipe's `profiles: {NAME: {stages: {...}, evaluate: {...}}}` overlay first.
    """
    import yaml

    path = builtin_recipe_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe ({e.strerror or e})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    lines = _yaml_lines(text)
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping with 'name' and 'stages'")
    known_top = {"name", "description", "stages", "evaluate", "report", "profiles", "launch"}
    for key in sorted(set(raw) - known_top):
        errors.append(f"line {lines.get((key,), '?')}: unknown top-level key {key!r} "
                      f"(known: {', '.join(sorted(known_top))})")
    profiles = raw.get("profiles") or {}
    if profile is not None:
        if profile not in profiles:
            raise ConfigError(f"{path}: no profile {profile!r} (profiles: {', '.join(profiles) or 'none'})")
        raw = _deep_merge(raw, profiles[profile])
    name = raw.get("name") or path.stem
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError(f"{path}: 'stages' must be a non-empty mapping of stage name -> options")
    stages_raw = dict(stages_raw)
    _expand_evaluate(raw, stages_raw, errors, lines)
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
    order = _toposort(stages, errors)
    run_dir = Path(run_dir) if run_dir else Path("runs") / name
    folders = {s: run_dir / s for s in stages}
    for sname in order:
        st = stages[sname]
        st.folder = folders[sname]
        stype = STAGE_TYPES[st.type]
        resolved = _resolve(st.options, {k: v for k, v in folders.items() if k in st.deps})
        out_value = str(st.folder / stype.output_file) if stype.output_file else str(st.folder)
        for key in [stype.output_field, *stype.pipeline_fields]:
            if key in st.options:
                errors.append(f"line {lines.get(('stages', sname, key), st.line)}: stage {sname!r}: option "
                              f"{key!r} is set by the pipeline; remove it")
        resolved[stype.output_field] = out_value
        try:
            cls = _load(stype.config)
        except ImportError as e:
            errors.append(f"line {st.line}: stage {sname!r}: stage type {st.type!r} is unavailable ({e})")
            continue
        field_names = {f.name for f in dataclasses.fields(cls)}
        resolved.update({k: v for k, v in stype.pipeline_fields.items() if k in field_names})
        for err in config_errors(cls, resolved, where=f"stage {sname!r}"):
            key = err.split(":")[0].split(".")[-1] if "." in err.split(":")[0] else None
            line = lines.get(("stages", sname, key), st.line) if key else st.line
            errors.append(f"line {line}: {err}")
        for err in _input_errors(st, resolved, stages):
            errors.append(f"line {st.line}: stage {sname!r}: {err}")
        st.resolved = resolved
    if errors:
        raise ConfigError(f"{path}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))
    return Recipe(name, path, run_dir, {s: stages[s] for s in order}, raw)


def _input_errors(st: Stage, resolved: dict, stages: dict) -> list[str]:
    """Model inputs that are local paths must exist (or be produced by a stage)."""
    errors = []
    for key in ("model", "source", "reference", "base", "models"):
        value = st.options.get(key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, dict):
                v = v.get("model")
            if not isinstance(v, str) or v.split("/", 1)[0] in stages:
                continue
            looks_local = v.startswith((".", "/", "~")) or os.path.exists(v)
            if looks_local and not Path(v).expanduser().exists():
                errors.append(f"input {key}={v!r} does not exist and no stage makes it")
    return errors


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
# Running
# --------------------------------------------------------------------------------------------------

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


def _stage_marker_path(st: Stage) -> Path:
    stype = STAGE_TYPES[st.type]
    return st.folder / MARKER if (stype.checkpoint or stype.output_field == "out") else st.folder / MARKER


def stage_done(st: Stage, recipe: Recipe) -> bool:
    marker = st.folder / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("fingerprint") == stage_fingerprint(st, recipe)
    except (OSError, json.JSONDecodeError):
        return False


def _check_disk(st: Stage, need_bytes: int | None) -> None:
    if not need_bytes:
        return
    parent = st.folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need_bytes * 1.1:
        raise UpstackError(f"stage {st.name!r}: needs about {need_bytes / 1e9:.2f} GB in {parent}, "
                           f"only {free / 1e9:.2f} GB free")


def estimate_stage(st: Stage, recipe: Recipe, sizes: dict[str, dict]) -> dict:
    """Parameters, disk and memory estimate of a stage for --dry-run (best effort, no weights read)."""
    info: dict[str, Any] = {}
    opts = st.resolved
    if st.type == "upscale":
        from upstack.upscale import UpscaleConfig, upscale

        src = opts["source"]
        src_stage = next((d for d in st.deps if str(recipe.stages[d].folder) == src), None)
        if src_stage and src_stage in sizes and "config" in sizes[src_stage]:
            info.update(_upscale_estimate_from_config(sizes[src_stage]["config"], opts))
        else:
            cfg_dir = _config_folder_for(src)
            if cfg_dir is not None:
                rep = upscale(UpscaleConfig(**{**{k: v for k, v in opts.items() if k in _fields(UpscaleConfig)},
                                               "source": str(cfg_dir), "dry_run": True}))
                info.update({"num_hidden_layers": rep["num_hidden_layers"], "num_parameters": rep["num_parameters"],
                             "disk_bytes": rep["output_bytes"], "config": _remapped_config(cfg_dir, opts)})
    elif st.type in ("pretrain", "sft", "dpo", "merge", "eval", "contamination", "synth-math"):
        model = opts.get("model") or (opts.get("models") or [None])[0]
        if isinstance(model, dict):
            model = model.get("model")
        dep = next((d for d in st.deps if model and str(recipe.stages[d].folder) == str(model)), None)
        if dep and dep in sizes:
            keys = ("num_parameters", "config", "num_hidden_layers")
            if st.type in ("pretrain", "sft", "dpo", "merge"):  # saved in the input's dtype
                keys += ("disk_bytes",)
            info.update({k: sizes[dep][k] for k in keys if k in sizes[dep]})
        if "num_parameters" in info and st.type in ("pretrain", "sft", "dpo"):
            p = info["num_parameters"]
            # bf16 weights + fp32 grads + AdamW fp32 moments + fp32 master copy ~ 18 bytes/param (plus activations);
            # DPO keeps a frozen reference in bf16 unless reference log-probs are precomputed.
            mem = p * 18 + (p * 2 if st.type == "dpo" and not opts.get("precompute_ref", True) else 0)
            info["train_memory_bytes"] = mem
        elif "num_parameters" in info and st.type in ("eval", "contamination"):
            # bf16 weights for inference (contamination also holds the reference model)
            info["inference_memory_bytes"] = info["num_parameters"] * 2 * (2 if st.type == "contamination" else 1)
    elif st.type == "base":
        cfg = _base_config_dict(opts)
        if cfg is not None:
            from upstack.upscale import count_parameters_from_config

            info["config"] = cfg
            info["num_parameters"] = count_parameters_from_config(cfg)
            info["num_hidden_layers"] = cfg["num_hidden_layers"]
            info["disk_bytes"] = info["num_parameters"] * 4
    return info


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _base_config_dict(opts: dict) -> dict | None:
    try:
        from upstack.base import BaseConfig, model_config_dict

        return model_config_dict(config_from_dict(BaseConfig, opts, "base"), vocab_size=opts.get("vocab_size") or 512)
    except Exception:  # estimate only
        return None


# Public hyperparameters of models a recipe names by hub id, so that `run --dry-run` can plan offline
# without the checkpoint (the real run needs the downloaded folder).
KNOWN_CONFIGS = {
    "mistralai/Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
        "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    },
}


def _config_folder_for(source: str) -> Path | None:
    p = Path(source).expanduser()
    if (p / "config.json").is_file():
        return p
    if source in KNOWN_CONFIGS:
        import tempfile

        d = Path(tempfile.mkdtemp(prefix="upstack-known-"))
        (d / "config.json").write_text(json.dumps(KNOWN_CONFIGS[source]))
        return d
    return None


def _remapped_config(cfg_dir: Path, opts: dict) -> dict:
    from upstack.arch import get_arch, remap_config
    from upstack.checkpoint import read_config
    from upstack.upscale import make_layer_plan

    cfg = read_config(cfg_dir)
    arch = get_arch(cfg, True)
    plan = make_layer_plan(cfg[arch.layer_count_key], opts.get("method", "dus"), opts.get("m"), opts.get("layers"),
                           opts.get("every"))
    return remap_config(cfg, arch, plan.layer_map)[0]


def _upscale_estimate_from_config(cfg: dict, opts: dict) -> dict:
    import tempfile

    from upstack.upscale import count_parameters_from_config

    d = Path(tempfile.mkdtemp(prefix="upstack-plan-"))
    (d / "config.json").write_text(json.dumps(cfg))
    new = _remapped_config(d, opts)
    shutil.rmtree(d, ignore_errors=True)
    p = count_parameters_from_config(new)
    return {"config": new, "num_parameters": p, "num_hidden_layers": new["num_hidden_layers"], "disk_bytes": p * 4}


def plan_recipe(recipe: Recipe) -> list[dict]:
    """The --dry-run plan: each stage with status, inputs, and size/memory estimates."""
    sizes: dict[str, dict] = {}
    rows = []
    will_run: set[str] = set()
    for st in recipe.stages.values():
        try:
            est = estimate_stage(st, recipe, sizes)
        except UpstackError as e:
            est = {"note": str(e)}
        sizes[st.name] = est
        # a stage after one that will run gets new inputs, so it runs too
        done = not (set(st.deps) & will_run) and stage_done(st, recipe)
        if not done:
            will_run.add(st.name)
        rows.append({
            "stage": st.name, "type": st.type, "deps": st.deps, "folder": str(st.folder),
            "done": done,
            **{k: v for k, v in est.items() if k != "config"},
        })
    return rows


# Stages that run on every process under `accelerate launch` (they shard work themselves); the others run
# on the main process while the rest wait.
DISTRIBUTED_STAGES = {"base", "pretrain", "sft", "dpo", "eval"}


def _process_state():
    """accelerate's process state when launched with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def run_recipe(recipe: Recipe, *, from_stage: str | None = None, only: str | None = None,
               quiet: bool = False, report: bool = True, log=print) -> dict:
    """Run every stage not already done (same resolved config and inputs); write report.md after each.

    Under `accelerate launch` (WORLD_SIZE > 1) every process runs this loop: training and eval stages
    run on all processes, the others on the main process only, with a barrier after each stage; only
    the main process writes markers and reports (the run folder must be on a shared file system).
    """
    state = _process_state()
    main = state is None or state.is_main_process
    names = list(recipe.stages)
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in recipe.stages:
            raise ConfigError(f"{flag} {value!r}: no such stage (stages: {', '.join(names)})")
    force: set[str] = set()
    if from_stage:
        force = set(names[names.index(from_stage):])
    if only:
        force = {only}
        for dep in recipe.stages[only].deps:
            if not (recipe.stages[dep].folder / MARKER).is_file():
                raise UpstackError(f"--only {only}: its input stage {dep!r} has not completed; run it first")
    recipe.run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        (recipe.run_dir / "recipe.yaml").write_text(recipe.path.read_text())
    summary = {"recipe": str(recipe.path), "run_dir": str(recipe.run_dir), "stages": {}}
    sizes: dict[str, dict] = {}
    for st in recipe.stages.values():
        try:
            sizes[st.name] = estimate_stage(st, recipe, sizes) if STAGE_TYPES[st.type].checkpoint else {}
        except Exception:  # an estimate is best effort; the stage itself validates its inputs
            sizes[st.name] = {}
        if only and st.name != only:
            continue
        if st.name not in force and stage_done(st, recipe):
            log(f"[{st.name}] up to date, skipped")
            summary["stages"][st.name] = "skipped"
            continue
        log(f"[{st.name}] running {st.type} -> {st.folder}")
        if state is None:
            _check_disk(st, sizes[st.name].get("disk_bytes"))
            _run_stage(st, recipe, quiet)
        else:
            if main:
                _check_disk(st, sizes[st.name].get("disk_bytes"))
            if main or st.type in DISTRIBUTED_STAGES:
                _run_stage(st, recipe, quiet, write_marker=main)
            state.wait_for_everyone()
        summary["stages"][st.name] = "ran"
        if report and main:
            _write_report(recipe)
    if report and main and "ran" not in summary["stages"].values():
        _write_report(recipe)  # nothing ran: the report still reflects this version's report format
    return summary


def _run_stage(st: Stage, recipe: Recipe, quiet: bool, write_marker: bool = True) -> None:
    stype = STAGE_TYPES[st.type]
    cls = _load(stype.config)
    fn = _load(stype.target)
    resolved = dict(st.resolved)
    if "quiet" in _fields(cls) and quiet:
        resolved["quiet"] = True
    cfg = config_from_dict(cls, resolved, where=f"stage {st.name!r}")
    marker = st.folder / MARKER
    if write_marker and marker.exists():
        marker.unlink()
    if stype.output_file:
        st.folder.mkdir(parents=True, exist_ok=True)
    fingerprint = stage_fingerprint(st, recipe)
    started = time.time()
    result = fn(cfg)
    seconds = time.time() - started
    if not write_marker:
        return
    st.folder.mkdir(parents=True, exist_ok=True)
    record = {
        "stage": st.name, "type": st.type, "fingerprint": fingerprint, "config": config_to_dict(cfg),
        "deps": st.deps, "seconds": round(seconds, 2),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "result": result if isinstance(result, (dict, list)) else None,
    }
    write_text_atomic(marker, json.dumps(record, indent=2, default=str) + "\n")


def _write_report(recipe: Recipe) -> None:
    try:
        from upstack.report import write_report
    except ImportError:
        return
    write_report(recipe.run_dir, recipe)
