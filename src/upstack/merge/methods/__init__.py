"""The merge methods, one file each; this table names them (the CLI's order) and their specs."""

from __future__ import annotations

from upstack.errors import ConfigError
from upstack.merge.methods import dare, linear, slerp, task_arithmetic, ties
from upstack.merge.spec import MethodSpec

METHODS: dict[str, MethodSpec] = {
    "linear": linear.SPEC,
    "slerp": slerp.SPEC,
    "task_arithmetic": task_arithmetic.SPEC,
    "ties": ties.SPEC,
    "dare_linear": dare.LINEAR_SPEC,
    "dare_ties": dare.TIES_SPEC,
}
ALIASES = {"average": "linear"}


def canonical_method(method: str) -> str:
    m = ALIASES.get(method, method)
    if m not in METHODS:
        choices = ", ".join([*METHODS, *ALIASES])
        raise ConfigError(f"unknown merge method {method!r} (choose from {choices})")
    return m
