"""A PEFT adapter folder at the gate: its files (any PEFT type, for `eval --model-args peft=`), and a LoRA
config's values checked as PEFT reads them, with its rank/alpha patterns matched in bounded time.

PEFT picks a module's rank and alpha from `rank_pattern` / `alpha_pattern` by the first key that matches
the end of the module's name as a regex (`peft.utils.other.get_pattern_key`: `(.*\\.)?(KEY)$`). Python's
`re` backtracks without bound: `(.|.)*x` against a 31-character module name runs for minutes. The keys
are compiled with `re` (what PEFT accepts), limited in length, and matched with the `regex` module (the
same syntax; a transformers dependency) under a time limit, only against modules that exist in the base.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from upstack.checkpoint.reader import PICKLE_REFUSED, checked_file, read_safetensors_header
from upstack.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
MAX_PATTERN_CHARS = 200   # a rank_pattern / alpha_pattern key longer than this is refused
PATTERN_SECONDS = 1.0     # all pattern matching of one adapter, at most
FP32_MAX = 3.4028234663852886e38


def _read_json_object(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                              ) from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return cfg


def check_adapter_folder(folder: str | Path, *, allow_pickle: bool = False) -> Path:
    """The gate for a PEFT adapter folder that PEFT itself will load (any adapter type): adapter_config.json
    and the weights inside the folder and regular files, safetensors headers strict, a pickled
    adapter_model.bin only with allow_pickle. Returns the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: " + ("not a folder (a PEFT adapter is a folder)" if folder.exists()
                                               else "no such folder"))
    cfg = folder / ADAPTER_CONFIG
    if not cfg.exists():
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    _read_json_object(checked_file(folder, cfg))
    weights, pickled = folder / ADAPTER_WEIGHTS, folder / ADAPTER_PICKLE
    if weights.exists():
        read_safetensors_header(checked_file(folder, weights))
    elif pickled.exists():
        checked_file(folder, pickled)
        if not allow_pickle:
            raise CheckpointError(f"{pickled}: the adapter's weights are pickled, {PICKLE_REFUSED}")
    else:
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS}")
    return folder


def _positive_number(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an integer beyond any float
        return False


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_patterns(path: Path, cfg: dict, key: str, valid, what: str) -> list[tuple[str, object, object]]:
    """[(pattern, value, compiled matcher)] of `cfg[key]` (a mapping of regex -> value); one line otherwise."""
    import regex

    patterns = cfg.get(key)
    if patterns is None or patterns == {}:
        return []
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{path}: {key} must map module-name patterns to {what}, got {type(patterns).__name__} "
                              f"{str(patterns)[:60]!r}")
    out = []
    for pat, value in patterns.items():
        if len(pat) > MAX_PATTERN_CHARS:
            raise CheckpointError(f"{path}: {key} pattern {pat[:40]!r}... is longer than {MAX_PATTERN_CHARS} "
                                  "characters")
        if not valid(value):
            raise CheckpointError(f"{path}: {key} {pat!r} must be {what}, got {value!r}")
        try:
            re.compile(pat)  # what PEFT accepts
            matcher = regex.compile(rf"(.*\.)?({pat})$")
        except (re.error, regex.error) as e:
            raise CheckpointError(f"{path}: {key} pattern {pat!r} is not a valid regular expression ({e})") from None
        out.append((pat, value, matcher))
    return out


def read_lora_config(folder: str | Path) -> tuple[dict, list, list]:
    """An adapter folder's adapter_config.json, checked as a LoRA config PEFT would load: peft_type LORA,
    r a positive integer, lora_alpha a positive finite number, rank_pattern / alpha_pattern mappings of
    valid regexes (at most MAX_PATTERN_CHARS long) to such values. Returns (config, rank patterns, alpha
    patterns), the patterns as [(key, value, compiled matcher)] for PatternMatcher."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    if not path.exists():
        raise CheckpointError(f"{folder}: not a PEFT adapter folder (no {ADAPTER_CONFIG})")
    cfg = _read_json_object(checked_file(folder, path))
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise CheckpointError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA adapters, "
                              "including rsLoRA and DoRA, can be merged)")
    if not _positive_int(cfg.get("r")):
        raise CheckpointError(f"{path}: r must be a positive integer, got {cfg.get('r')!r}")
    if not _positive_number(cfg.get("lora_alpha")):
        raise CheckpointError(f"{path}: lora_alpha must be a positive finite number, got {cfg.get('lora_alpha')!r}")
    return (cfg, _check_patterns(path, cfg, "rank_pattern", _positive_int, "a positive integer rank"),
            _check_patterns(path, cfg, "alpha_pattern", _positive_number, "a positive finite alpha"))


class PatternMatcher:
    """PEFT's get_pattern_key over the compiled patterns of one adapter, within PATTERN_SECONDS in all."""

    def __init__(self, path: Path):
        self.path = path
        self.deadline = time.monotonic() + PATTERN_SECONDS

    def value(self, patterns: list, module: str, default, key: str) -> tuple[object, str | None]:
        """(the value of the first pattern matching `module`, that pattern), or (default, None)."""
        for pat, value, matcher in patterns:
            try:
                hit = matcher.match(module, timeout=max(1e-6, self.deadline - time.monotonic()))
            except TimeoutError:
                raise CheckpointError(
                    f"{self.path}: {key} pattern {pat!r} takes too long to match the module names (over "
                    f"{PATTERN_SECONDS:g} s in all; nested repetition such as (a+)+?); write a simpler pattern"
                ) from None
            if hit:
                return value, pat
        return default, None


def module_scale(cfg: dict, rank: int, alpha, path: Path, module: str) -> float:
    """lora_alpha / r (rsLoRA: / sqrt(r)), refused when it is not a finite float32 number (the merge computes
    in float32)."""
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    if not scale <= FP32_MAX:
        raise CheckpointError(f"{path}: module {module}: lora_alpha {alpha!r} with r={rank} gives the scale "
                              f"{scale:g}, beyond float32's range")
    return scale
