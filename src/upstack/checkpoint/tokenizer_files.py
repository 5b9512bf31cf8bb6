"""Comparing the tokenizer files of two checkpoint folders (merge, and the model layer for dpo and
contamination, whose models must share one vocabulary)."""

from __future__ import annotations

import json
from pathlib import Path

from upstack.checkpoint.reader import checked_file
from upstack.errors import UpstackError


def token_table(folder: str | Path) -> dict[str, int] | None:
    """token -> id from a folder's tokenizer.json (vocabulary and added tokens); None when there is no
    readable tokenizer.json or its model has no vocabulary table."""
    p = Path(folder) / "tokenizer.json"
    if not p.is_file():
        return None
    checked_file(folder, p)
    try:
        tok = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    vocab = (tok.get("model") or {}).get("vocab")
    if isinstance(vocab, list):  # unigram: [[piece, score], ...]
        vocab = {v[0]: i for i, v in enumerate(vocab) if isinstance(v, list) and v}
    if not isinstance(vocab, dict):
        return None
    table = dict(vocab)
    for t in tok.get("added_tokens") or []:
        if isinstance(t, dict) and "content" in t and "id" in t:
            table[t["content"]] = t["id"]
    return table


def check_same_tokenizer_files(folder_a: str | Path, label_a: str, folder_b: str | Path, label_b: str) -> None:
    """Same vocab size is not enough: refuse tokenizers that map the same ids to different tokens.

    Compares the tokenizer.json files of two folders; passes when either has none (nothing to compare).
    """
    ta, tb = token_table(folder_a), token_table(folder_b)
    if ta is None or tb is None or ta == tb:
        return
    ids_a = {i: tok for tok, i in ta.items()}
    ids_b = {i: tok for tok, i in tb.items()}
    for i in sorted(set(ids_a) | set(ids_b)):
        if ids_a.get(i) != ids_b.get(i):
            raise UpstackError(f"vocabularies differ: token id {i} is {ids_a.get(i)!r} in {label_a}'s tokenizer.json "
                               f"but {ids_b.get(i)!r} in {label_b}'s; merged embedding rows would mix unrelated tokens")
