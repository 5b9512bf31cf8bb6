"""Preference accuracy of a model on held-out (prompt, chosen, rejected) pairs, scored as DPO scores them.

Each pair is rendered with the model's chat template (the alpaca format when it has none), exactly as
`upstack dpo` encodes its training pairs, and each side's completion is scored by its summed log-prob
under the model. Reported per file:

    accuracy            share of pairs with log p(chosen) > log p(rejected)
    accuracy_per_token  the same with log-probs averaged per completion token (length-normalised)
    margin              mean of log p(chosen) - log p(rejected), in nats
    chosen_logp, rejected_logp, chosen_nll_per_token

With a reference model (`reference`, e.g. the SFT model a DPO model started from) the DPO implicit
reward r = log p(y) - log p_ref(y) is compared too, as reward benchmarks score DPO models:

    reward_accuracy     share of pairs with r(chosen) > r(rejected)
    reward_margin       mean of r(chosen) - r(rejected), in nats (DPO's reward margin divided by beta)

With `group_field` (e.g. `kind` in the demo's pairs: the kind of mistake in the rejected answer), the
same metrics are also reported per value of that field of each row, under "groups".

The file is anything `upstack dpo` reads as preference data (a `prompt`/`chosen`/`rejected` JSONL in
conversational or plain-text form, the Orca/UltraFeedback layouts, ...).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from upstack.data.chat import encode_pairs, resolve_template
from upstack.data.jsonl import read_json_rows
from upstack.data.loading import load_dpo_rows, parse_data_spec
from upstack.errors import DataError
from upstack.lm import (
    collate_segments,
    forward_scored,
    load_for_inference,
    model_max_positions,
    pad_token_id,
    sequence_logps,
    to_device,
)

log = logging.getLogger(__name__)


def _pair_logps(model, tokenizer, enc, pairs: list[tuple[int, int]], batch_size: int):
    """[(chosen logp, rejected logp, chosen tokens, rejected tokens)] for encoded pairs, in order."""
    import torch

    dev = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    out = []
    b = max(1, batch_size // 2)
    with torch.no_grad():
        for lo in range(0, len(pairs), b):
            chunk = pairs[lo:lo + b]
            seqs = [c for c, _ in chunk] + [r for _, r in chunk]
            batch = collate_segments([[enc.get(s)] for s in seqs], pad_id, False)
            batch = to_device(batch, dev)
            logps, n_tok = sequence_logps(*forward_scored(model, batch))
            n = len(chunk)
            for i in range(n):
                out.append((float(logps[i]), float(logps[n + i]), int(n_tok[i]), int(n_tok[n + i])))
    return out


def _groups(path: Path, field: str, n_rows: int) -> list[str]:
    """The `field` value of each row of a JSONL/JSON file (rows must line up with the loaded pairs)."""
    raw = read_json_rows(path)
    values = []
    for where, row in raw:
        value = row.get(field)
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise DataError(f"{path}: {where}: --preference-group {field!r}: expected a string or integer field"
                            + (" (missing)" if value is None else f", got {type(value).__name__}"))
        values.append(str(value))
    if len(values) != n_rows:
        raise DataError(f"{path}: --preference-group needs every row to be a usable pair: {len(values)} rows, "
                        f"{n_rows} pairs loaded")
    return values


def _summary(scores: list[tuple[float, float, int, int]], ref: list | None) -> dict:
    n = len(scores)
    out = {
        "scored": n,
        "accuracy": sum(c > r for c, r, _, _ in scores) / n,
        "accuracy_per_token": sum(c / max(nc, 1) > r / max(nr, 1) for c, r, nc, nr in scores) / n,
        "margin": sum(c - r for c, r, _, _ in scores) / n,
        "chosen_logp": sum(s[0] for s in scores) / n,
        "rejected_logp": sum(s[1] for s in scores) / n,
        "chosen_nll_per_token": -sum(s[0] for s in scores) / max(1, sum(s[2] for s in scores)),
    }
    if ref is not None:
        d = [(c - rc) - (r - rr) for (c, r, _, _), (rc, rr, _, _) in zip(scores, ref)]
        out.update({"reward_accuracy": sum(x > 0 for x in d) / n, "reward_margin": sum(d) / n})
    return out


def preference(model: Any, file: str | Path, *, tokenizer=None, reference: Any = None, reference_tokenizer=None,
               template: str = "auto", max_length: int | None = None, batch_size: int = 8,
               limit: int | None = None, group_field: str | None = None, device: str | None = None,
               dtype: str = "auto", allow_pickle: bool = False) -> dict:
    """Preference accuracy of `model` (a checkpoint folder, or a loaded model with `tokenizer`) on `file`.

    `reference` (a folder or a loaded model with `reference_tokenizer`) adds the implicit-reward metrics.
    Folders pass the checkpoint gate first (pickled weights only with `allow_pickle`).
    Returns {"file", "pairs", "scored", "dropped", "template", "max_length", "accuracy", "accuracy_per_token",
    "margin", "chosen_logp", "rejected_logp", "chosen_nll_per_token"} (+ "reference", "reward_accuracy",
    "reward_margin"; + "groups": {value: the same metrics} with `group_field`)."""
    import numpy as np

    path = Path(file)
    if not path.is_file():
        raise DataError(f"--preference {file}: file not found")
    rows, _ = load_dpo_rows([parse_data_spec(str(path))])
    groups = _groups(path, group_field, len(rows)) if group_field else None
    if limit:
        rows = rows[:limit]
    if isinstance(model, (str, Path)):
        model, tokenizer = load_for_inference(str(model), device=device, dtype=dtype, allow_pickle=allow_pickle)
    used = resolve_template(tokenizer, template, str(getattr(model, "name_or_path", "model")))
    window = min(max_length or model_max_positions(model), model_max_positions(model))
    enc, pairs, stats = encode_pairs(tokenizer, rows, window)
    if not pairs:
        raise DataError(f"{file}: no pair can be scored: every one lost a completion to the {window}-token context")
    if stats["truncated"]:
        log.warning("%s: %d of %d sequences were longer than %d tokens and were truncated; %d pairs dropped",
                    file, stats["truncated"], 2 * len(rows), window, stats["pairs_dropped"])
    scores = _pair_logps(model, tokenizer, enc, pairs, batch_size)
    ref = None
    out: dict[str, Any] = {"file": str(file), "pairs": len(rows), "dropped": stats["pairs_dropped"], "template": used,
                           "max_length": window}
    if reference is not None:
        ref_name = str(reference)
        if isinstance(reference, (str, Path)):
            reference, reference_tokenizer = load_for_inference(str(reference), device=device, dtype=dtype,
                                                                what="reference model", allow_pickle=allow_pickle)
        else:
            ref_name = str(getattr(reference, "name_or_path", "reference"))
        resolve_template(reference_tokenizer, template, ref_name)
        ref_enc, ref_pairs, _ = encode_pairs(reference_tokenizer, rows, window)
        if ref_pairs != pairs or not all(np.array_equal(ref_enc.get(s)[0], enc.get(s)[0]) for p in pairs for s in p):
            raise DataError(f"{file}: the reference model's tokenizer or chat template renders the pairs differently "
                            "from the model's; implicit rewards need the same tokens")
        ref = _pair_logps(reference, reference_tokenizer, enc, pairs, batch_size)
        out["reference"] = ref_name
    out.update(_summary(scores, ref))
    if groups is not None:
        # pairs[i] = (chosen seq, rejected seq); the chosen side of row j is conversation 2j
        rows_of = [enc.source_rows[c] // 2 for c, _ in pairs]
        out["groups"] = {}
        for g in sorted(set(groups[j] for j in rows_of)):
            idx = [i for i, j in enumerate(rows_of) if groups[j] == g]
            out["groups"][g] = {"pairs": len(idx), **_summary([scores[i] for i in idx],
                                                              [ref[i] for i in idx] if ref else None)}
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise DataError(f"{file}: {k} is {v} (the model produced non-finite log-probs)")
    return out
