"""`upstack pretrain`: continued pretraining (causal LM) on raw text, packed into fixed-length blocks.

Documents stream from the data layer (`.txt`, JSONL/parquet with a text field, several sources with
weights), are tokenized in batches with eos after each, and are appended to a token file on disk
(`<out>.work/tokens/train.bin`, uint16 or uint32) by the main process -- the corpus is never held in
memory. Training reads blocks of --seq-len tokens from it through a memory map. Inside a block,
position ids restart after every eos, so where the model supports it (supports_packed_positions)
attention never crosses a document boundary; the first token of a document is never a label of the
previous one. A seeded share of blocks (--eval-fraction), or --eval-data, gives eval loss and perplexity.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from upstack.data.loading import LoadReport, iter_text_documents
from upstack.errors import ConfigError, DataError
from upstack.lm import (
    collate_segments,
    load_tokenizer,
    pad_token_id,
    supports_packed_positions,
)
from upstack.outputs import atomic_file
from upstack.train.checkpointing import save_final
from upstack.train.config import TrainConfig, check_config, train_and_eval_specs
from upstack.train.inputs import held_out_split
from upstack.train.loop import Task, train_loop
from upstack.train.metrics import add_perplexity
from upstack.train.model import (
    lm_loss,
    load_training_model,
    prepare_model,
    trainable_model,
)
from upstack.train.run import (
    Run,
    data_fingerprint,
    identity_key,
    seed_everything,
    start_run,
    tokenizer_fingerprint,
)
from upstack.train.schedule import fit_batch_to_items

log = logging.getLogger("upstack.train")


@dataclass
class PretrainConfig(TrainConfig):
    learning_rate: float = 1e-4
    max_length: int = 2048             # block length (--seq-len)
    eval_fraction: float = 0.01


TOKEN_FILE_VERSION = 2    # bump when the token file's layout or making changes (old caches are rebuilt)
MAX_PIECE_CHARS = 1 << 17  # longer documents are tokenized piece by piece: a fast tokenizer holds ~100 B a char


def document_pieces(doc: str, max_chars: int = MAX_PIECE_CHARS) -> Iterator[str]:
    """`doc` in pieces of at most `max_chars` characters, each cut just before a whitespace character (so
    the next piece starts with it, as a word does inside the whole text); a run without whitespace is cut
    at `max_chars`. Pieces concatenate back to `doc`; one is made at a time."""
    start = 0
    while len(doc) - start > max_chars:
        end = start + max_chars
        cut = max((doc.rfind(c, start + 1, end) for c in " \n\t"), default=-1)
        if cut <= start:
            cut = end
        yield doc[start:cut]
        start = cut
    yield doc[start:] if start else doc


def split_long_document(doc: str, max_chars: int = MAX_PIECE_CHARS) -> list[str]:
    """document_pieces as a list."""
    return list(document_pieces(doc, max_chars))


def document_id_pieces(tokenizer, doc: str, eos: int, max_chars: int = MAX_PIECE_CHARS) -> Iterator[list[int]]:
    """The ids of one document, piece by piece, with eos at its end. A long document is tokenized in pieces
    of `max_chars` (special tokens such as bos only before the first piece, eos only after the last), and
    each piece's ids are handed on before the next piece is tokenized: a 200 MB line costs the tokenizer's
    memory for 128K characters and one piece's ids at a time, never a Python list of all its ids (which
    took 3.7 GB). For byte-level BPE tokenizers the ids equal those of the whole string; a SentencePiece one
    may differ at the rare piece boundaries."""
    pending: list[int] | None = None  # a piece's ids are held back until it is known whether it is the last
    first = True
    for piece in document_pieces(doc, max_chars):
        part = tokenizer(piece, add_special_tokens=first)["input_ids"]
        if first and len(piece) < len(doc) and part and part[-1] == eos:
            part = part[:-1]  # a tokenizer that appends eos: only after the whole document
        first = False
        if pending:
            yield pending
        pending = part
    if not pending or pending[-1] != eos:
        pending = (pending or []) + [eos]
    yield pending


def document_ids(tokenizer, doc: str, eos: int, max_chars: int = MAX_PIECE_CHARS) -> list[int]:
    """All of document_id_pieces in one list (for short documents and tests)."""
    return [i for part in document_id_pieces(tokenizer, doc, eos, max_chars) for i in part]


def tokenize_to_file(specs, tokenizer, path: Path, *, seed: int, skip_bad_rows: bool, progress: bool,
                     batch_docs: int = 1000, key: str | None = None, max_chars: int = MAX_PIECE_CHARS) -> dict:
    """Stream documents into a flat token file (eos after each document); return its metadata.

    Written to a temporary sibling and renamed, with `path.json` (metadata, with the inputs' `key`) last, so
    a half-written file is never mistaken for a finished one. Short documents are tokenized in batches,
    longer ones than `max_chars` piece by piece, each piece written as it is made (document_id_pieces)."""
    import numpy as np
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos token, which pretraining puts between documents")
    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    report = LoadReport(kind="text", seed=seed)
    docs = iter_text_documents(specs, seed=seed, skip_bad_rows=skip_bad_rows, report=report)
    n_tokens = n_docs = max_id = 0
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress, leave=False)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            def write(ids: list[int], *, ends_document: bool = True) -> None:
                nonlocal n_tokens, n_docs, max_id
                arr = np.asarray(ids, dtype=dtype)
                if len(arr):
                    max_id = max(max_id, int(arr.max()))
                arr.tofile(f)
                n_tokens += len(arr)
                if ends_document:
                    n_docs += 1
                    bar.update(1)

            def flush(batch: list[str]) -> None:
                if not batch:
                    return
                for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
                    write(ids if ids and ids[-1] == eos else ids + [eos])

            batch: list[str] = []
            for doc in docs:
                if len(doc) > max_chars:
                    flush(batch)
                    batch = []
                    for part in document_id_pieces(tokenizer, doc, eos, max_chars):
                        write(part, ends_document=False)
                    n_docs += 1
                    bar.update(1)
                    continue
                batch.append(doc)
                if len(batch) >= batch_docs:
                    flush(batch)
                    batch = []
            if batch:
                flush(batch)
    bar.close()
    meta = {"tokens": n_tokens, "documents": n_docs, "dtype": np.dtype(dtype).name, "eos": eos, "max_id": max_id,
            "data": report.to_dict(), "key": key}
    path.with_name(path.name + ".json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def token_cache_key(specs, cfg: TrainConfig) -> str:
    """What a token file is made of: the data specs and their files' identities, the tokenizer's files, the
    seed and --skip-bad-rows. A token file whose recorded key differs is rebuilt, never reused."""
    import dataclasses

    return identity_key({"specs": [dataclasses.asdict(s) for s in specs], "files": data_fingerprint(specs),
                         "tokenizer": tokenizer_fingerprint(cfg.model), "seed": cfg.seed,
                         "skip_bad_rows": cfg.skip_bad_rows, "version": TOKEN_FILE_VERSION})


def _cached_key(meta_path: Path) -> str | None:
    try:
        return json.loads(meta_path.read_text()).get("key")
    except (OSError, ValueError):
        return None


def token_file(run: Run, specs, tokenizer, name: str) -> tuple:
    """The memory-mapped token file `name` in the work folder, built once by the main process; rebuilt when
    the key of its inputs (token_cache_key) differs from the one it was made with."""
    import numpy as np

    folder = run.work / "tokens"
    path = folder / f"{name}.bin"
    meta_path = path.with_name(path.name + ".json")
    failed = path.with_name(path.name + ".failed")
    key = token_cache_key(specs, run.cfg)
    if run.is_main and meta_path.is_file() and _cached_key(meta_path) != key:
        run.log(f"{path} was made from other data or another tokenizer; tokenizing again")
        meta_path.unlink()
    if run.is_main and not meta_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        failed.unlink(missing_ok=True)
        try:
            meta = tokenize_to_file(specs, tokenizer, path, seed=run.cfg.seed,
                                    skip_bad_rows=run.cfg.skip_bad_rows, progress=run.cfg.progress, key=key)
        except BaseException as e:
            failed.write_text(f"{type(e).__name__}: {e}\n")
            raise
        run.log(f"tokenized {meta['documents']} documents into {meta['tokens']} tokens ({path})")
    # The other processes poll for the result rather than wait at a collective barrier, whose timeout
    # a large corpus could outlast.
    while not meta_path.is_file() or _cached_key(meta_path) != key:
        if failed.is_file():
            raise DataError(f"tokenizing {name} data failed on the main process: {failed.read_text().strip()}")
        time.sleep(2)
    meta = json.loads(meta_path.read_text())
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r") if meta["tokens"] else np.zeros(0, meta["dtype"])
    return tokens, meta


def block_segments(block, eos: int) -> list[tuple]:
    """Split one block of tokens after every eos: one (ids, label mask) segment per document piece."""
    import numpy as np

    cuts = np.nonzero(block[:-1] == eos)[0] + 1
    return [(seg, np.ones(len(seg), dtype=bool)) for seg in np.split(block, cuts)]


def pretrain(cfg: PretrainConfig) -> dict:
    """Run continued pretraining; returns the summary (final/eval loss and perplexity, out path)."""
    import numpy as np

    check_config(cfg)
    specs, eval_specs = train_and_eval_specs(cfg)
    with start_run(cfg, "pretrain") as run:
        seed_everything(cfg.seed)
        tokenizer = load_tokenizer(cfg.model)
        tokens, meta = token_file(run, specs, tokenizer, "train")
        L = cfg.max_length
        n_blocks = meta["tokens"] // L
        if n_blocks == 0:
            raise DataError(f"the training text has {meta['tokens']} tokens, less than one block of --seq-len {L}")
        eval_tokens, eval_meta = tokens, meta
        if eval_specs:
            blocks = np.arange(n_blocks)
            eval_tokens, eval_meta = token_file(run, eval_specs, tokenizer, "eval")
            eval_blocks = np.arange(eval_meta["tokens"] // L)
            if not len(eval_blocks):
                raise DataError(f"the eval text has {eval_meta['tokens']} tokens, less than one block of {L}")
        else:
            if cfg.eval_fraction and n_blocks == 1 and run.is_main:
                log.warning("eval_fraction: the corpus is a single block; no eval split")
            blocks, eval_blocks = held_out_split(n_blocks, cfg.eval_fraction, cfg.seed, keep_one=True)

        model, input_dtype = load_training_model(cfg, max(meta["max_id"], eval_meta["max_id"]), run)
        reset = supports_packed_positions(model)
        if not reset and run.is_main:
            log.warning(f"{type(model).__name__} cannot stop attention at position restarts: documents packed "
                        "into one block attend to each other")
        model, layers = trainable_model(model, cfg)
        eos, pad_id = meta["eos"], pad_token_id(tokenizer)
        run.info.update({"documents": meta["documents"], "corpus_tokens": meta["tokens"], "blocks": int(len(blocks)),
                         "eval_blocks": int(len(eval_blocks)), "document_masking": reset,
                         "dropped_tail_tokens": int(meta["tokens"] - n_blocks * L), **layers})

        def rows_of(source, block_ids, idx):
            return [block_segments(np.asarray(source[b * L:(b + 1) * L], dtype=np.int64), eos)
                    for b in (int(block_ids[i]) for i in idx)]

        def collate(idx):
            return collate_segments(rows_of(tokens, blocks, idx), pad_id, reset)

        def eval_collate(idx):
            return collate_segments(rows_of(eval_tokens, eval_blocks, idx), pad_id, reset)

        model, optimizer = prepare_model(run, model)
        fit_batch_to_items(cfg, len(blocks), run.world, "blocks", run.warn)
        task = Task(n_items=len(blocks), collate=collate, loss_fn=lm_loss, n_eval=len(eval_blocks),
                    eval_collate=eval_collate, derive=add_perplexity)
        summary = train_loop(run, model, optimizer, task)
        summary.update({k: run.info[k] for k in ("documents", "corpus_tokens", "blocks", "eval_blocks",
                                                   "document_masking")})
        summary["data"] = meta["data"]
        return save_final(run, model, tokenizer, summary, input_dtype=input_dtype)

