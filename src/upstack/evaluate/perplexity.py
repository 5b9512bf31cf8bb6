"""Perplexity of a causal LM on a text file or JSONL, with a sliding window over long documents.

A `.txt` file is one document; a `.jsonl`/`.json` file is one document per row (its `text_field`).
Each document is tokenised as the model's tokenizer does by default (with BOS where it adds one) and
scored in windows of `max_length` tokens that advance by `stride` (at most max_length - 1): every
token after the first is predicted exactly once, with `max_length - stride` tokens of context
carried over from the previous window (the method of the transformers "perplexity of fixed-length
models" guide, whose loop with stride == max_length would skip one token per window).
Perplexity = exp(total NLL / predicted tokens); bits per byte (tokenizer-independent) is reported too.

`load_model` is shared with the contamination test.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from upstack.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)


def load_model(path: str, *, device: str | None = None, dtype: str = "auto", what: str = "model"):
    """(model, tokenizer) from a checkpoint folder, in eval mode on `device`; errors as CheckpointError."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upstack.evaluate.harness import check_model_path, resolve_device

    check_model_path(path, what)
    device = resolve_device(device)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise ConfigError(f"--dtype {dtype}: not a torch dtype (auto, float32, bfloat16, float16)")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot load {what} {path}: {msg}") from e
    model.to(device).eval()
    if len(tok) > model.get_input_embeddings().num_embeddings:
        log.warning("%s %s: tokenizer has %d tokens but the model only %d embeddings; texts using the extra "
                    "tokens cannot be scored", what, path, len(tok), model.get_input_embeddings().num_embeddings)
    return model, tok


def max_positions(model) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def check_ids(ids: list[int], model, where: str) -> None:
    n = model.get_input_embeddings().num_embeddings
    if ids and max(ids) >= n:
        raise CheckpointError(f"{where}: the tokenizer produced token id {max(ids)} but the model has only {n} "
                              "embeddings (tokenizer and model do not match)")


def read_texts(file: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    """Documents of a .txt file (one) or a JSONL/JSON file (one per row, field `text_field`)."""
    from upstack.evaluate.tasks.formats import read_json_rows

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
               device: str | None = None, dtype: str = "auto", limit: int | None = None) -> dict:
    """Perplexity of `model` (a checkpoint folder, or a loaded model with `tokenizer`) on `file`.

    Returns {"file", "documents", "tokens", "nll", "perplexity", "bytes", "bits_per_byte", "max_length", "stride"}.
    """
    import torch
    import torch.nn.functional as F

    texts = read_texts(file, text_field, limit)
    if isinstance(model, (str, Path)):
        model, tokenizer = load_model(str(model), device=device, dtype=dtype)
    elif tokenizer is None:
        raise ConfigError("perplexity: pass the tokenizer with a loaded model")
    window = min(max_length or max_positions(model), max_positions(model))
    if window < 2:
        raise ConfigError(f"perplexity needs a window of at least 2 tokens, got {window}")
    stride = stride or max(1, window // 2)
    if stride < 1:
        raise ConfigError(f"--stride must be at least 1, got {stride}")
    stride = min(stride, window - 1)  # at least one token of context in every window

    items = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, verbose=False)["input_ids"]  # long documents are windowed below: no length warning
        check_ids(ids, model, f"{file}: document {i + 1}")
        if len(ids) >= 2:
            items += windows(ids, window, stride)
    if not items:
        raise DataError(f"{file}: documents too short to score (fewer than 2 tokens)")
    items.sort(key=lambda w: len(w[0]))
    dev = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
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
                total_nll += float(nll[mask].sum())
                total_tokens += int(mask.sum())
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    nll = total_nll / total_tokens
    return {"file": str(file), "documents": len(texts), "tokens": total_tokens, "nll": nll,
            "perplexity": math.exp(nll), "bytes": n_bytes, "bits_per_byte": total_nll / math.log(2) / n_bytes,
            "max_length": window, "stride": stride}
