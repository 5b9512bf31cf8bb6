"""What a stage trains on: rows loaded, encoded and split into training and held-out items.

sft and dpo share one opening (load rows, load the tokenizer and resolve the chat template, encode,
hold out eval items or encode --eval-data); pretrain shares the held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from upstack.data.chat import resolve_template
from upstack.data.loading import LoadReport
from upstack.lm import load_tokenizer
from upstack.train.run import Run


def held_out_split(n: int, fraction: float, seed: int, *, keep_one: bool = False) -> tuple:
    """(training indices, held-out indices) of n items, each a sorted int array: a seeded share `fraction`
    (at least one) held out; none when fraction is 0 or n < 2. keep_one: at most n - 1 held out."""
    import numpy as np

    if not fraction or n < 2:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    perm = np.random.default_rng([seed, 1]).permutation(n)
    n_eval = max(1, round(fraction * n))
    if keep_one:
        n_eval = min(n - 1, n_eval)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


# (rows, report) from data specs; the data layer's load_sft_rows / load_dpo_rows.
LoadRows = Callable[..., tuple[list, LoadReport]]
# (tokenizer, rows, max_length, skip_bad_rows) -> (encoded sequences, items, encoding statistics)
Encode = Callable[[Any, list, int, bool], tuple[Any, list, dict]]


@dataclass
class ChatData:
    """Encoded conversations of a chat stage (sft: items are sequence indices; dpo: (chosen, rejected) pairs)."""

    tokenizer: Any
    template: str              # the template used: chat | alpaca
    rows: list                 # the training rows as loaded
    report: LoadReport
    enc: Any                   # data.chat.Encoded of the training rows
    items: list                # training items (indices into enc)
    stats: dict                # encoding statistics of the training rows
    eval_enc: Any              # Encoded the eval items index into (enc itself for a held-out share)
    eval_items: list

    def max_token_id(self) -> int:
        return max(int(self.enc.ids.max(initial=0)), int(self.eval_enc.ids.max(initial=0)))


def load_chat_data(run: Run, specs: list, eval_specs: list, load_rows: LoadRows, encode: Encode,
                   check: Callable[[list, list, dict], None]) -> ChatData:
    """Load and encode the training rows, `check` them (the stage's truncation warning and "nothing left"
    error: check(rows, items, stats)), then encode --eval-data or hold out --eval-fraction of the items."""
    cfg = run.cfg
    rows, report = load_rows(specs, skip_bad_rows=cfg.skip_bad_rows, seed=cfg.seed)
    run.log(str(report))
    tokenizer = load_tokenizer(cfg.model)
    template = resolve_template(tokenizer, cfg.template, cfg.model)
    enc, items, stats = encode(tokenizer, rows, cfg.max_length, cfg.skip_bad_rows)
    check(rows, items, stats)
    eval_enc, eval_items = enc, []
    if eval_specs:
        eval_rows, _ = load_rows(eval_specs, skip_bad_rows=cfg.skip_bad_rows, seed=cfg.seed)
        eval_enc, eval_items, _ = encode(tokenizer, eval_rows, cfg.max_length, cfg.skip_bad_rows)
    else:
        train_idx, eval_idx = held_out_split(len(items), cfg.eval_fraction, cfg.seed, keep_one=True)
        items, eval_items = [items[i] for i in train_idx], [items[i] for i in eval_idx]
    return ChatData(tokenizer, template, rows, report, enc, items, stats, eval_enc, eval_items)
