"""What a merge method is, as data: its parameters, their defaults, and how it trims and combines."""

from __future__ import annotations

import dataclasses

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    needs_base: bool
    defaults: dict            # parameter -> default (REQUIRED when it has none)
    per_model: tuple = ()     # parameters a model entry may set for itself
    consensus: bool = False   # TIES sign election
    trim: str | None = None   # "magnitude" (TIES) or "random" (DARE)
    doc: str = ""
