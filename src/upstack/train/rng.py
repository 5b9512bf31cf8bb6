"""The random-number state a resumable checkpoint keeps for each process, and its check at --resume.

accelerate's save_state writes `random_states_<rank>.pkl` (Python, NumPy, torch and device generators);
upstack's FSDP checkpoints write `rng_state_<rank>.pt`. accelerate's load_state skips an unreadable file
without a word, and a resume then draws other dropout masks and data-dependent random numbers than the
uninterrupted run would: so every process's file is checked when the resume point is chosen, and a
missing or corrupt one refuses the resume unless --resume-ignore-rng says to go on without it.
"""

from __future__ import annotations

import random
from pathlib import Path

ACCELERATE_RNG = "random_states_{rank}.pkl"   # accelerate.utils.RNG_STATE_NAME + "_<rank>.pkl"
FSDP_RNG = "rng_state_{rank}.pt"              # train/sharding.save_sharded
# The generators' states under each layout's keys: (python, numpy, torch).
_KEYS = {ACCELERATE_RNG: ("random_state", "numpy_random_seed", "torch_manual_seed"),
         FSDP_RNG: ("python", "numpy", "torch")}


def rng_file(folder: str | Path, rank: int, sharding: str) -> Path:
    """The RNG state file of process `rank` in a resumable checkpoint."""
    return Path(folder) / (FSDP_RNG if sharding == "fsdp" else ACCELERATE_RNG).format(rank=rank)


def read_rng_state(path: Path) -> dict:
    """{"python", "numpy", "torch"} generator states of an RNG file (either layout), each checked by setting
    it on a private generator; ValueError saying in a few words why the file cannot be used."""
    import numpy as np
    import torch
    from accelerate.utils import load  # torch.load(weights_only=True), NumPy's state types allowed

    layout = FSDP_RNG if path.name.startswith("rng_state_") else ACCELERATE_RNG
    if not path.is_file():
        raise ValueError("is missing")
    try:
        raw = load(path, map_location="cpu")
    except Exception as e:  # a truncated or overwritten file: torch raises several types
        raise ValueError(f"is truncated or corrupt (reading it raised {type(e).__name__})") from None
    try:
        state = dict(zip(("python", "numpy", "torch"), (raw[k] for k in _KEYS[layout])))
        random.Random().setstate(state["python"])
        np.random.RandomState().set_state(state["numpy"])
        torch.Generator().set_state(state["torch"])
    except Exception as e:  # a file that loads but does not hold the generators' states
        raise ValueError(f"does not hold the generators' states ({type(e).__name__})") from None
    if layout == FSDP_RNG and "cuda" in raw:
        state["cuda"] = raw["cuda"]
    return state


def rng_problem(path: Path) -> str | None:
    """Why the RNG file at `path` cannot restore the generators, or None when it can."""
    try:
        read_rng_state(path)
    except ValueError as e:
        return str(e)
    return None


def apply_rng_state(state: dict) -> None:
    """Set the process-wide Python, NumPy, torch (and CUDA, where saved) generators (read_rng_state's result)."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
