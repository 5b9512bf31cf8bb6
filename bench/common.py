"""Shared bench helpers: timing a command with its own peak RSS."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def timed(cmd: list[str]) -> tuple[float, int]:
    """Run cmd, then sync; return (seconds including the sync, peak RSS bytes of the command).

    Peak RSS comes from /usr/bin/time: Linux keeps a process's RSS high-water mark across exec, so a
    child forked straight from a (large) benchmark process would report our RSS, not its own.
    """
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    subprocess.run(["sync"], check=True)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return dt, int(proc.stderr.strip().splitlines()[-1]) * 1024


def record(text: str, save: bool = True) -> None:
    """Print a results section and (unless told not to) append it to bench/RESULTS.md."""
    print(text)
    if save:
        with open(RESULTS, "a") as f:
            f.write(text)
