"""Words and word n-grams for overlap tests: decontamination (decontaminate.py) and the synthetic
world's disjointness check (synthetic.py)."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable

UNICODE_PUNCTUATION = "\u2018\u2019\u201c\u201d\u2013\u2014\u2026\u00ab\u00bb\u00bf\u00a1\u2032\u2033"
NORMALISE = str.maketrans({**{c: None for c in string.punctuation + UNICODE_PUNCTUATION}, "\x00": " "})
_ALNUM_WORD = re.compile(r"[a-z0-9]+|#+|[+\-*=]")


def words(text: str, *, alnum: bool = False) -> list[str]:
    """Lowercase word tokens of `text`, in one of two normalisations that must stay as they are.

    alnum=False (decontamination): ASCII and common Unicode punctuation deleted ("don't" -> "dont",
    "3.5" -> "35"), split on whitespace. `decontaminate.word_hashes` computes exactly these words from
    UTF-8 bytes with numpy, and the usual 13-gram decontamination test normalises this way.
    alnum=True (the synthetic world): runs of a-z and 0-9, runs of '#', and the signs + - * =; anything
    else separates words ("don't" -> "don", "t"). Its disjointness counts and vocabulary figures are
    written into every world's manifest.json (same seed, same bytes), so it cannot follow the other.
    """
    if alnum:
        return _ALNUM_WORD.findall(text.lower())
    return text.lower().translate(NORMALISE).split()


def ngrams(text: str, n: int = 13) -> set[str]:
    """The set of word n-grams of `text` (alnum words; empty for texts shorter than n words)."""
    ws = words(text, alnum=True)
    return {" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)}


def ngram_overlap(eval_texts: Iterable[str], train_texts: Iterable[str], n: int = 13) -> list[str]:
    """Eval texts that share at least one word n-gram with any training text (the GPT-3 style test)."""
    eval_texts = list(eval_texts)
    wanted: dict[str, int] = {}
    for i, t in enumerate(eval_texts):
        for g in ngrams(t, n):
            wanted.setdefault(g, i)
    hits: set[int] = set()
    for t in train_texts:
        ws = words(t, alnum=True)
        for j in range(len(ws) - n + 1):
            i = wanted.get(" ".join(ws[j:j + n]))
            if i is not None:
                hits.add(i)
    return [eval_texts[i] for i in sorted(hits)]


def exact_overlap(eval_texts: Iterable[str], train_texts: Iterable[str]) -> list[str]:
    """Eval texts whose normalised form (alnum words, single-spaced) equals a training text's."""
    seen = {" ".join(words(t, alnum=True)) for t in train_texts}
    return [t for t in eval_texts if " ".join(words(t, alnum=True)) in seen]
