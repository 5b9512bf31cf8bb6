"""What a load did to each source's rows: `SourceReport` per source, `LoadReport` for the whole load."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from dataclasses import field as dc_field


@dataclass
class SourceReport:
    """What happened to one source's rows."""

    spec: str
    format: str | None = None
    read: int = 0                                      # rows (documents) read from the source
    filtered: int = 0                                  # dropped by the filter (text: also empty documents)
    skipped: int = 0                                   # malformed rows dropped (skip_bad_rows)
    skip_reasons: dict[str, int] = dc_field(default_factory=dict)
    skip_examples: list[str] = dc_field(default_factory=list)   # the first few, with file and row
    kept: int = 0                                      # rows that passed (before sampling/mixing)
    used: int = 0                                      # rows in the output

    def skip(self, reason: str, example: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] = self.skip_reasons.get(reason, 0) + 1
        if len(self.skip_examples) < 5:
            self.skip_examples.append(example)

    def counts(self) -> str:
        return (f"read {self.read}, filtered {self.filtered}, skipped {self.skipped},"
                f" kept {self.kept}, used {self.used}")


@dataclass
class LoadReport:
    """Per-source counts of a load; `str()` for people, `to_dict()` for --json."""

    kind: str                                          # "sft", "dpo" or "text"
    seed: int = 0
    sources: list[SourceReport] = dc_field(default_factory=list)

    @property
    def used(self) -> int:
        return sum(s.used for s in self.sources)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "used": self.used,
                "sources": [dataclasses.asdict(s) for s in self.sources]}

    def __str__(self) -> str:
        unit = "documents" if self.kind == "text" else "rows"
        lines = [f"{self.kind} data: {self.used} {unit} from {len(self.sources)} source(s)"]
        for s in self.sources:
            lines.append(f"  {s.spec} [{s.format or '?'}]: {s.counts()}")
            for reason, count in s.skip_reasons.items():
                lines.append(f"    skipped {count} x {reason}")
        return "\n".join(lines)
