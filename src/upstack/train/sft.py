"""`upstack sft`: instruction tuning with the loss on response tokens only.

Rows (`{"messages": [...]}` from the data layer, several sources mixed by samples/weights) are rendered
with the tokenizer's chat template -- or the SOLAR "### User: / ### Assistant:" format -- and only the
assistant turns carry labels (chat.py). Packing several examples into one row is on by default only
where restarting position ids also stops attention (so examples never see each other); otherwise rows
are padded per micro-batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from upstack.data.chat import TEMPLATES, encode_sft_rows
from upstack.data.loading import load_sft_rows
from upstack.errors import ConfigError, DataError
from upstack.lm import collate_segments, pad_token_id, supports_packed_positions
from upstack.train.checkpointing import save_final
from upstack.train.config import TrainConfig, check_config, train_and_eval_specs
from upstack.train.inputs import load_chat_data
from upstack.train.loop import Task, train_loop
from upstack.train.metrics import add_perplexity
from upstack.train.model import (
    lm_loss,
    load_training_model,
    prepare_model,
    trainable_model,
)
from upstack.train.run import seed_everything, start_run
from upstack.train.schedule import fit_batch_to_items

log = logging.getLogger("upstack.train")


@dataclass
class SFTConfig(TrainConfig):
    learning_rate: float = 2e-5
    template: str = "auto"             # auto | chat (the tokenizer's) | alpaca (### User: / ### Assistant:)
    packing: Optional[bool] = None     # None: on when the model stops attention at position restarts


def pack_examples(order: list[int], lengths: list[int], max_length: int) -> list[list[int]]:
    """Greedy in order: append examples to the current row until the next would pass max_length."""
    rows, current, used = [], [], 0
    for i in order:
        if current and used + lengths[i] > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        rows.append(current)
    return rows


def describe_truncation(stats: dict, max_length: int, what: str = "rows") -> Optional[str]:
    if not stats["truncated"]:
        return None
    return (f"{stats['truncated']} of {stats['rows']} {what} were longer than --max-length {max_length} and were "
            f"truncated (longest: {stats['longest']} tokens); {stats['no_response']} lost their whole response "
            "and were dropped")


def _encode(tokenizer, rows: list[dict], max_length: int, skip_bad_rows: bool):
    enc, keep = encode_sft_rows(tokenizer, rows, max_length, skip_bad_rows)
    return enc, keep, enc.stats


def check_sft_config(cfg: SFTConfig) -> None:
    """The shared checks, then SFT's own options (values only: the pipeline runs this before any stage)."""
    check_config(cfg)
    if cfg.template not in TEMPLATES:
        raise ConfigError(f"template: {cfg.template!r} is not one of {', '.join(TEMPLATES)}")


def sft(cfg: SFTConfig) -> dict:
    """Run supervised fine-tuning; returns the summary (final metrics, out path, data counts)."""
    import numpy as np

    check_sft_config(cfg)
    specs, eval_specs = train_and_eval_specs(cfg)
    with start_run(cfg, "sft") as run:
        seed_everything(cfg.seed)

        def check(rows, keep, stats):
            note = describe_truncation(stats, cfg.max_length)
            if note and run.is_main:
                log.warning(note)
            if not keep:
                raise DataError(f"no training rows left: all {len(rows)} rows lost their response to --max-length "
                                f"{cfg.max_length} (or had none)")

        data = load_chat_data(run, specs, eval_specs, load_sft_rows, _encode, check)
        enc, keep, eval_enc, eval_keep = data.enc, data.items, data.eval_enc, data.eval_items
        model, input_dtype = load_training_model(cfg, data.max_token_id(), run)
        supported = supports_packed_positions(model)
        packing = supported if cfg.packing is None else cfg.packing
        if packing and not supported:
            log.warning(f"--packing on {type(model).__name__}: this model cannot stop attention at position "
                        "restarts, so packed examples attend to each other (cross-contamination)")
        model, layers = trainable_model(model, cfg)
        run.info.update({"template": data.template, "packing": packing, "rows": len(data.rows),
                         "train_rows": len(keep), "eval_rows": len(eval_keep),
                         "truncated": enc.stats["truncated"], "dropped_no_response": enc.stats["no_response"],
                         "skipped_rows": enc.stats["skipped"] + sum(s.skipped for s in data.report.sources),
                         "template_fallback": enc.stats["template_fallback"], **layers})
        pad_id = pad_token_id(data.tokenizer)
        reset = packing and supported   # restart positions only where that also stops attention
        if packing:
            order = [keep[int(i)] for i in np.random.default_rng([cfg.seed, 2]).permutation(len(keep))]
            items = pack_examples(order, [enc.length(i) for i in range(len(enc))], cfg.max_length)
        else:
            items = [[k] for k in keep]
        fit_batch_to_items(cfg, len(items), run.world, "packed rows" if packing else "rows", run.warn)

        def collate(idx: list[int]) -> dict:
            return collate_segments([[enc.get(e) for e in items[i]] for i in idx], pad_id, reset, run.pad_multiple)

        def eval_collate(idx: list[int]) -> dict:
            return collate_segments([[eval_enc.get(eval_keep[i])] for i in idx], pad_id, False, run.pad_multiple)

        model, optimizer = prepare_model(run, model)
        task = Task(n_items=len(items), collate=collate, loss_fn=lm_loss, n_eval=len(eval_keep),
                    eval_collate=eval_collate, derive=add_perplexity)
        summary = train_loop(run, model, optimizer, task)
        summary.update({k: run.info[k] for k in ("template", "packing", "train_rows", "eval_rows", "truncated",
                                                   "dropped_no_response", "skipped_rows")})
        summary["data"] = data.report.to_dict()
        return save_final(run, model, data.tokenizer, summary, input_dtype=input_dtype)
