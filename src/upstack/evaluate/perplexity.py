"""Perplexity of a causal LM on a text file or JSONL, with a sliding window over long documents.

A `.txt` file is one document; a `.jsonl`/`.json` file is one document per row (its `text_field`).
Each document is tokenised as the model's tokenizer does by default (with BOS where it adds one) and
scored in windows of `max_length` tokens that advance by `stride` (at most max_length - 1): every
token after the first is predicted exactly once, with `max_length - stride` tokens of context
carried over from the previous window (the method of the transformers "perplexity of fixed-length
models" guide, whose loop with stride == max_length would skip one token per window).
Perplexity = exp(total NLL / predicted tokens); bits per byte (tokenizer-independent) is reported too.

"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from upstack.data.jsonl import read_json_rows
from upstack.errors import ConfigError, DataError
from upstack.lm import check_token_ids, load_for_inference, model_max_positions


def read_texts(file: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    """Documents of a .txt file (one) or a JSONL/JSON file (one per row, field `text_field`)."""
    path = Path(file)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() in (".jsonl", ".json"):
        texts = []
        for where, row in read_json_rows(path):
            if text_field not in row:
                raise DataError(f"{path}: {where}: missing field {text_field!r} (fields: {', '.join(sorted(row))}; "
                                "choose one with --text-field)")
            if not isinstance(row[text_field], str):
                raise DataError(f"{path}: {where}: field {text_field!r} should be a string")
            texts.append(row[text_field])
            if limit and len(texts) >= limit:
                break
    else:
        try:
            texts = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"{path}: no text to score")
    return texts


def windows(ids: list[int], max_length: int, stride: int) -> list[tuple[list[int], int]]:
    """[(window ids, index of the first token to score in it)] covering tokens 1..len-1 exactly once.

    The stride is capped at max_length - 1 so that every window's first scored token has context.
    """
    stride = max(1, min(stride, max_length - 1))
    out = []
    prev_end = 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        out.append((ids[begin:end], max(prev_end - begin, 1)))
        prev_end = end
        if end == len(ids):
            break
    return out


def perplexity(model: Any, file: str | Path, *, tokenizer=None, text_field: str = "text",
               max_length: int | None = None, stride: int | None = None, batch_size: int = 4,
               device: str | None = None, dtype: str = "auto", limit: int | None = None,
               max_tokens: int | None = None, allow_pickle: bool = False) -> dict:
    """Perplexity of `model` (a checkpoint folder, or a loaded model with `tokenizer`) on `file`.
    A folder passes the checkpoint gate first (pickled weights only with `allow_pickle`).

    `max_tokens` scores only the first N tokens of the file (documents in order, the last one cut): a fixed
    slice of a long held-out text. `perplexity_stderr` is the delta-method standard error over the scored
    windows (perplexity x the standard error of their token-weighted mean NLL); `windows` is their number.

    Returns {"file", "documents", "tokens", "nll", "perplexity", "perplexity_stderr", "windows", "bytes",
    "bits_per_byte", "max_length", "stride"}.
    """
    import torch
    import torch.nn.functional as F

    texts = read_texts(file, text_field, limit)
    if isinstance(model, (str, Path)):
        model, tokenizer = load_for_inference(str(model), device=device, dtype=dtype, allow_pickle=allow_pickle)
    elif tokenizer is None:
        raise ConfigError("perplexity: pass the tokenizer with a loaded model")
    window = min(max_length or model_max_positions(model), model_max_positions(model))
    if window < 2:
        raise ConfigError(f"perplexity needs a window of at least 2 tokens, got {window}")
    stride = stride or max(1, window // 2)
    if stride < 1:
        raise ConfigError(f"--stride must be at least 1, got {stride}")
    stride = min(stride, window - 1)  # at least one token of context in every window

    if max_tokens is not None and max_tokens < 2:
        raise ConfigError(f"perplexity max_tokens must be at least 2, got {max_tokens}")
    items, budget, n_bytes = [], max_tokens, 0
    for i, text in enumerate(texts):
        if budget is not None and budget < 2:
            texts = texts[:i]
            break
        ids = tokenizer(text, verbose=False)["input_ids"]  # long documents are windowed below: no length warning
        if budget is not None and len(ids) > budget:
            ids = ids[:budget]
            n_bytes += len(tokenizer.decode(ids).encode("utf-8"))
        else:
            n_bytes += len(text.encode("utf-8"))
        if budget is not None:
            budget -= len(ids)
        if ids:
            check_token_ids(model, max(ids), f"{file}: document {i + 1}")
        if len(ids) >= 2:
            items += windows(ids, window, stride)
    if not items:
        raise DataError(f"{file}: documents too short to score (fewer than 2 tokens)")
    items.sort(key=lambda w: len(w[0]))
    dev = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    per_window: list[tuple[float, int]] = []  # (summed NLL, tokens) of each window
    with torch.no_grad():
        for b in range(0, len(items), max(1, batch_size)):
            batch = items[b:b + max(1, batch_size)]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            attn = torch.zeros(len(batch), width, dtype=torch.long)
            score = torch.zeros(len(batch), width, dtype=torch.bool)
            for r, (ids, first) in enumerate(batch):
                input_ids[r, :len(ids)] = torch.tensor(ids)
                attn[r, :len(ids)] = 1
                score[r, first:len(ids)] = True
            input_ids, attn, score = input_ids.to(dev), attn.to(dev), score.to(dev)
            logits = model(input_ids=input_ids, attention_mask=attn).logits
            for r in range(len(batch)):  # one row at a time keeps the float32 copy of the logits small
                nll = F.cross_entropy(logits[r, :-1].float(), input_ids[r, 1:], reduction="none")
                mask = score[r, 1:]
                per_window.append((float(nll[mask].sum()), int(mask.sum())))
                total_nll += per_window[-1][0]
                total_tokens += per_window[-1][1]
    nll = total_nll / total_tokens
    return {"file": str(file), "documents": len(texts), "tokens": total_tokens, "nll": nll,
            "perplexity": math.exp(nll), "perplexity_stderr": _ppl_stderr(per_window, nll),
            "windows": len(per_window), "bytes": n_bytes, "bits_per_byte": total_nll / math.log(2) / n_bytes,
            "max_length": window, "stride": stride}


def _ppl_stderr(per_window: list[tuple[float, int]], nll: float) -> float | None:
    """exp(nll) x the standard error of the ratio estimate sum(NLL_w) / sum(tokens_w) over windows w (None for
    one window): the spread of the per-window losses, not of single tokens, which are not independent."""
    n = len(per_window)
    if n < 2:
        return None
    mean_tokens = sum(t for _, t in per_window) / n
    var = sum((s - nll * t) ** 2 for s, t in per_window) / (n - 1)
    return math.exp(nll) * math.sqrt(var / n) / mean_tokens
