"""Shared helpers for commands: JSON output, simple aligned tables, the flags every checkpoint writer has
(no subcommand here)."""

from __future__ import annotations

import json
import sys


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return str(n)


def add_writer_flags(p, *, dry_run: str, shard_default: str | None = "5GB", pickle_what: str = "weights") -> None:
    """The flags of every command that writes a checkpoint: shard size, overwrite, dry run, pickle, JSON."""
    p.add_argument("--shard-size", default=shard_default, help="max shard size with units: 5GB (default), 500MB, 2GiB")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only after the new one is complete)")
    p.add_argument("--dry-run", action="store_true", help=dry_run)
    p.add_argument("--allow-pickle", action="store_true",
                   help=f"read pickled .bin {pickle_what} (loaded with torch.load(weights_only=True))")
    p.add_argument("--json", action="store_true", help="print the plan/result as JSON")
