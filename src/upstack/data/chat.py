"""Conversations -> token ids with a response mask (SFT and DPO share this).

A conversation is rendered once with the chat template; the characters of each trained assistant turn
are found by rendering prefixes (the conversation up to the turn with the generation prompt, and up to
the end of the turn): the turn's span is the difference, trailing whitespace excluded, so it covers the
reply and its end-of-turn token (e.g. `Hello.</s>`) but not the `<s>assistant\\n` header. The whole
text is tokenized in one call (the tokenization the model sees at inference), and a token is a response
token when its characters overlap a span. Templates whose prefixes are not prefixes of the full render
fall back to locating the reply text itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from upstack.errors import ConfigError, DataError

log = logging.getLogger("upstack.data")

TEMPLATES = ("auto", "chat", "alpaca")

# Work per row is bounded by max_length: only the first max_length * MAX_CHARS_PER_TOKEN characters of a
# conversation's content are rendered and tokenized. A token is at most a few dozen characters in any
# real vocabulary (Mistral/Llama's longest piece is 16; GPT-style BPEs stay under 64 apart from runs of
# spaces, which still give one token per 64 characters or more), so the first max_length tokens of the
# whole conversation lie well inside the kept characters and come out the same; the rest would be cut
# by truncation anyway. Without it a 60 MB row with --max-length 64 was tokenized whole (6.4 GB, 86 s).
MAX_CHARS_PER_TOKEN = 64

# The "### User: / ### Assistant:" format SOLAR-10.7B-Instruct uses, with bos at the start and eos
# closing every reply. {% generation %} marks the trained span for tools that read it.
ALPACA_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '### System:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Assistant:\n' }}"
    "{% generation %}{{ message['content'] }}{% if eos_token %}{{ eos_token }}{% endif %}{% endgeneration %}"
    "{{ '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)


def resolve_template(tokenizer, mode: str, model: str) -> str:
    """Apply --template: 'chat' needs the tokenizer's own template, 'alpaca' installs the SOLAR format,
    'auto' uses the tokenizer's template when it has one, else alpaca. Returns the name used."""
    if mode not in TEMPLATES:
        raise ConfigError(f"template: {mode!r} is not one of {', '.join(TEMPLATES)}")
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if mode == "chat" and not has_own:
        raise ConfigError(f"{model}: the tokenizer has no chat template (use --template alpaca)")
    if mode == "alpaca" or (mode == "auto" and not has_own):
        if mode == "auto":
            log.info("the tokenizer has no chat template; using the alpaca ('### User: / ### Assistant:') format")
        tokenizer.chat_template = ALPACA_TEMPLATE
        return "alpaca"
    return "chat"


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_with_spans(tokenizer, messages: list[dict], train_from: int = 0) -> tuple[str, list[tuple[int, int]], bool]:
    """(text, [(start, end) char spans of trained assistant turns], whether the prefix method worked).

    Assistant turns at index >= train_from are trained (SFT: all of them; DPO: the completion)."""
    full = _render(tokenizer, messages, False)
    spans = []
    exact = True
    search_from = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant" or i < train_from:
            continue
        before = _render(tokenizer, messages[:i], True) if i else ""
        through = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1], False)
        if through.startswith(before) and full.startswith(through):
            start, end = len(before), len(through)
            while end > start and full[end - 1].isspace():
                end -= 1
        else:  # the template rewrites earlier turns: find the reply itself (plus an eos right after it)
            exact = False
            content = msg["content"]
            start = full.find(content, search_from)
            if start < 0:
                raise DataError("the chat template does not reproduce an assistant reply verbatim")
            end = start + len(content)
            eos = getattr(tokenizer, "eos_token", None)
            if eos and full.startswith(eos, end):
                end += len(eos)
        if end > start:
            spans.append((start, end))
        search_from = end
    return full, spans, exact


@dataclass
class Encoded:
    """Token ids and response masks of many sequences, stored flat (int32 / bool) to keep RAM small."""

    ids: Any                     # np.int32 [total tokens]
    mask: Any                    # np.bool_ [total tokens]: token is a response (label) token
    offsets: Any                 # np.int64 [n + 1]
    source_rows: list[int]       # index of the input row each sequence came from
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, i: int):
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ids[a:b], self.mask[a:b]

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])


def bound_conversation(messages: list[dict], max_length: int) -> tuple[list[dict], bool]:
    """(the conversation cut to what can reach its first `max_length` tokens, whether it was cut).

    That is its first max_length * MAX_CHARS_PER_TOKEN characters of message content, and at most
    max_length + 1 messages (every message renders at least one token of its own: its role markup or
    its non-empty content). The message where the character budget runs out keeps its first
    characters; the messages after it, whose tokens all lie past max_length, are dropped (rendering
    every prefix of thousands of turns is quadratic). Templates render messages in order, so the kept
    text renders as it does in the whole conversation."""
    max_chars = max_length * MAX_CHARS_PER_TOKEN
    if len(messages) > max_length + 1:
        return bound_conversation(messages[:max_length + 1], max_length)[0], True
    total = 0
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if not isinstance(content, str):
            continue
        if total + len(content) > max_chars:
            keep = max_chars - total
            return messages[:i] + ([{**msg, "content": content[:keep]}] if keep > 0 else []), True
        total += len(content)
    return messages, False


def _token_mask(offsets, spans) -> Any:
    import numpy as np

    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(off), dtype=bool)
    for s, e in spans:
        mask |= (off[:, 1] > s) & (off[:, 0] < e) & (off[:, 1] > off[:, 0])
    return mask


def encode_conversations(tokenizer, conversations: list[list[dict]], train_from: list[int], max_length: int,
                         *, skip_bad_rows: bool = False, batch_size: int = 512) -> Encoded:
    """Render and tokenize conversations; truncate to max_length (counted); report what was cut.

    Each conversation is first cut to max_length * MAX_CHARS_PER_TOKEN characters of content and
    max_length + 1 messages (`bound_conversation`), so a huge row costs no more than a long one and keeps the same first
    max_length tokens; `longest` then counts the tokens of what was kept.

    Returns every conversation (even those left without response tokens, so DPO can drop whole pairs);
    stats: rows, truncated, no_response (nothing left to learn after truncation), template_fallback,
    skipped (bad rows, with skip_bad_rows), tokens."""
    import numpy as np

    ids_parts, mask_parts, lengths, source = [], [], [], []
    stats = {"rows": len(conversations), "truncated": 0, "no_response": 0, "template_fallback": 0,
             "skipped": 0, "tokens": 0, "longest": 0}
    fast = bool(getattr(tokenizer, "is_fast", False))
    for lo in range(0, len(conversations), batch_size):
        texts, spans, rows, cut = [], [], [], set()
        for j in range(lo, min(lo + batch_size, len(conversations))):
            conversation, was_cut = bound_conversation(conversations[j], max_length)
            if was_cut:
                cut.add(j)
            try:
                text, sp, exact = render_with_spans(tokenizer, conversation, train_from[j])
            except DataError as e:
                if not skip_bad_rows:
                    raise DataError(f"training row {j + 1}: {e} (--skip-bad-rows skips such rows and counts "
                                    "them)") from None
                stats["skipped"] += 1
                continue
            except Exception as e:  # jinja raises its own errors (TemplateError, exceptions the template raises)
                if not skip_bad_rows:
                    raise DataError(f"training row {j + 1}: the chat template cannot render it "
                                    f"({type(e).__name__}: {e}); --template alpaca avoids the model's template") from None
                stats["skipped"] += 1
                continue
            stats["template_fallback"] += 0 if exact else 1
            texts.append(text)
            spans.append(sp)
            rows.append(j)
        if not texts:
            continue
        if fast:
            enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            encoded = [(enc["input_ids"][k], _token_mask(enc["offset_mapping"][k], spans[k]))
                       for k in range(len(texts))]
        else:
            encoded = [_encode_by_pieces(tokenizer, t, sp) for t, sp in zip(texts, spans)]
        for (ids, mask), j in zip(encoded, rows):
            n = len(ids)
            stats["longest"] = max(stats["longest"], n)
            if n > max_length or j in cut:
                stats["truncated"] += 1
                ids, mask = ids[:max_length], mask[:max_length]
            if not mask[1:].any():   # the first token is never predicted
                stats["no_response"] += 1
            ids_parts.append(np.asarray(ids, dtype=np.int32))
            mask_parts.append(np.asarray(mask, dtype=bool))
            lengths.append(len(ids))
            source.append(j)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32)
    mask = np.concatenate(mask_parts) if mask_parts else np.zeros(0, bool)
    stats["tokens"] = int(offsets[-1])
    return Encoded(ids, mask, offsets, source, stats)


def _encode_by_pieces(tokenizer, text: str, spans: list[tuple[int, int]]):
    """Tokenizers without offsets: tokenize the text piece by piece (response pieces marked)."""
    import numpy as np

    ids, mask, at = [], [], 0
    for s, e in spans + [(len(text), len(text))]:
        for piece, is_resp in ((text[at:s], False), (text[s:e], True)):
            if piece:
                toks = tokenizer(piece, add_special_tokens=False)["input_ids"]
                ids.extend(toks)
                mask.extend([is_resp] * len(toks))
        at = e
    return ids, np.asarray(mask, dtype=bool)


def encode_sft_rows(tokenizer, rows: list[dict], max_length: int, skip_bad_rows: bool = False):
    """Encoded conversations (all assistant turns trained) and the indices that keep response tokens."""
    enc = encode_conversations(tokenizer, [r["messages"] for r in rows], [0] * len(rows), max_length,
                               skip_bad_rows=skip_bad_rows)
    keep = [i for i in range(len(enc)) if enc.get(i)[1][1:].any()]
    return enc, keep


def encode_pairs(tokenizer, rows: list[dict], max_length: int, skip_bad_rows: bool = False):
    """Encode prompt+chosen and prompt+rejected of every pair (completion tokens labelled); keep pairs
    where both sides still have completion tokens after truncation. Returns (encoded, kept pairs, stats)
    where pair p is sequences kept[p] = (chosen index, rejected index)."""
    convs, train_from = [], []
    for r in rows:
        for side in ("chosen", "rejected"):
            convs.append(list(r["prompt"]) + list(r[side]))
            train_from.append(len(r["prompt"]))
    enc = encode_conversations(tokenizer, convs, train_from, max_length, skip_bad_rows=skip_bad_rows)
    by_conv = {c: s for s, c in enumerate(enc.source_rows)}
    kept = []
    for p in range(len(rows)):
        c, r = by_conv.get(2 * p), by_conv.get(2 * p + 1)
        if c is None or r is None:
            continue
        if enc.get(c)[1][1:].any() and enc.get(r)[1][1:].any():
            kept.append((c, r))
    stats = dict(enc.stats)
    stats["pairs"] = len(rows)
    stats["pairs_dropped"] = len(rows) - len(kept)
    return enc, kept, stats
