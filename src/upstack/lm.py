"""The model layer: the one place that opens a model and its tokenizer, and scores sequences with it.

Training (pretrain, sft, dpo), evaluation (perplexity, preference, contamination) and every later
stage that needs a live model go through here, so that they agree on:
- which paths are models: a local checkpoint folder passes the checkpoint gate (strict headers, no path
  outside the folder, no pickle unless asked); a Hub id is allowed online, and offline only when it is in
  the local Hugging Face cache;
- how a model is loaded (dtype, device, no remote code) and what its limits are (max positions,
  vocabulary), and how a tokenizer's ids are checked against the model's embedding table;
- how rows of token segments become a batch (`collate_segments`) and how a batch is scored
  (`forward_scored`, `sequence_logps`).

torch and transformers are imported inside the functions that need them: importing this module is cheap.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from upstack.arch import get_arch
from upstack.checkpoint import TORCH_DTYPE_NAMES, open_checkpoint, read_config
from upstack.errors import CheckpointError, ConfigError, UpstackError
from upstack.hub import hub_offline, is_hub_id, offline_reason

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
DEFAULT_MAX_POSITIONS = 2048


# ------------------------------------------------------------------------------------------------
# Paths: the one check every command makes before it loads a model

def _cached_snapshot(repo_id: str, filename: str = "config.json") -> Path | None:
    """The local snapshot folder of a Hub repository already in the Hugging Face cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, filename)
    return Path(found).parent if isinstance(found, str) else None


def local_or_cached(path: str, what: str = "model", marker: str = "config.json") -> Path | None:
    """The local folder `path` names: itself, or for a Hub id the cached snapshot holding `marker` when offline
    (CheckpointError if none); None for a Hub id online (fetched when loaded)."""
    p = Path(path)
    if not p.exists() and is_hub_id(path):
        if not hub_offline():
            return None
        cached = _cached_snapshot(path, marker)
        if cached is None:
            raise CheckpointError(f"{what} {path}: no such folder (it is not a local folder, and the Hugging Face "
                                  f"Hub is offline: {offline_reason()}, and it is not in the local cache)")
        return cached
    return p


def check_model_path(path: str, what: str = "model", *, allow_pickle: bool = False) -> None:
    """Refuse, in one line, a model path that cannot be loaded safely; load nothing.

    A local folder must hold config.json and pass the checkpoint gate (`open_checkpoint`); a Hub id is
    accepted online (transformers fetches it) and offline only when the cache already holds it."""
    p = local_or_cached(path, what)
    if p is None:
        return
    if not p.exists():
        raise CheckpointError(f"{what} {path}: no such folder")
    if not p.is_dir():
        raise CheckpointError(f"{what} {path}: not a folder (expected a Hugging Face checkpoint folder)")
    if not (p / "config.json").exists():
        raise CheckpointError(f"{what} {path}: not a loadable checkpoint folder (no config.json)")
    try:
        open_checkpoint(p, allow_pickle=allow_pickle, weights_required=True)
    except CheckpointError as e:
        msg = str(e).removeprefix(f"{p}: ")
        raise CheckpointError(f"cannot load {what} {path}: {msg}") from None


def model_config(path: str) -> dict | None:
    """config.json of a local checkpoint folder (None for a Hub id or an unreadable file)."""
    try:
        return read_config(path) if Path(path).is_dir() else None
    except UpstackError:
        return None


def checkpoint_dtype(path: str) -> str:
    """The torch dtype name most of a checkpoint's floating tensors are stored in (float32 when unknown)."""
    p = Path(path)
    if p.is_dir():
        try:
            counts = open_checkpoint(p).dtypes
            floats = {k: v for k, v in counts.items() if k in ("F32", "BF16", "F16", "F64")}
            if floats:
                return TORCH_DTYPE_NAMES[max(floats, key=floats.get)]
        except UpstackError:
            pass
        cfg = model_config(path) or {}
        value = cfg.get("dtype") or cfg.get("torch_dtype")
        return value if value in ("float32", "bfloat16", "float16") else "float32"
    try:  # a hub id (online): its config says
        from transformers import AutoConfig

        value = str(getattr(AutoConfig.from_pretrained(path), "dtype", None) or "float32").removeprefix("torch.")
        return value if value in ("float32", "bfloat16", "float16") else "float32"
    except (OSError, ValueError):
        return "float32"


def max_positions(config: Any) -> int | None:
    """The longest sequence a model's config allows (a loaded model, its config object, or a dict)."""
    cfg = getattr(config, "config", config)
    cfg = (cfg.get("text_config") if isinstance(cfg, dict) else getattr(cfg, "text_config", None)) or cfg
    for key in POSITION_KEYS:
        value = cfg.get(key) if isinstance(cfg, dict) else getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_max_positions(model: Any) -> int:
    """max_positions of a loaded model, with the conventional 2048 when its config names none."""
    return max_positions(model) or DEFAULT_MAX_POSITIONS


# ------------------------------------------------------------------------------------------------
# Loading

def cpu_only_launch() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without an accelerator: accelerate
    must be told to use CPU processes with gloo (it would otherwise run each as a single process)."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    has = getattr(torch, "accelerator", None)
    return not (has.is_available() if has is not None else torch.cuda.is_available())


def resolve_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_dtype(dtype: str):
    import torch

    if dtype == "auto":
        return "auto"
    value = getattr(torch, dtype, None) if dtype in DTYPES else None
    if value is None:
        raise ConfigError(f"--dtype {dtype}: not a torch dtype ({', '.join(DTYPES)})")
    return value


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_tokenizer(path: str, what: str = "model"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({_first_line(e)})") from None


def load_model(path: str, *, dtype: str = "auto", device: str | None = None, attn_implementation: str | None = None,
               quantization_config: Any = None, what: str = "model"):
    """AutoModelForCausalLM from a checked path, without remote code; on `device` when given;
    quantized on load with a transformers quantization config (QLoRA's 4-bit NF4)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype), "trust_remote_code": False}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        raise CheckpointError(f"cannot load {what} {path}: {_first_line(e)}") from None
    return model.to(device) if device else model


def load_model_skeleton(path: str, *, dtype: str = "auto", attn_implementation: str | None = None):
    """The model of `path`'s config with its parameters on the meta device (no memory, no weights read) and
    its buffers real (rotary tables, which no checkpoint holds): for the processes of a sharded run that
    receive their weights from process 0 after sharding."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as e:
        raise CheckpointError(f"cannot build model {path}: {_first_line(e)}") from None
    model.tie_weights()  # from_config leaves tied embeddings untied; from_pretrained ties them
    return model


def load_for_inference(path: str, *, device: str | None = None, dtype: str = "auto", what: str = "model",
                       allow_pickle: bool = False):
    """(model, tokenizer) in eval mode on `device` (default: cuda when available), after the path check
    (pickled weights only with `allow_pickle`)."""
    check_model_path(path, what, allow_pickle=allow_pickle)
    model = load_model(path, dtype=dtype, device=resolve_device(device), what=what).eval()
    tok = load_tokenizer(path, what)
    n = model.get_input_embeddings().num_embeddings
    if len(tok) > n:
        log.warning("%s %s: tokenizer has %d tokens but the model only %d embeddings; texts using the extra "
                    "tokens cannot be scored", what, path, len(tok), n)
    return model, tok


def load_adapter(model, adapter: str, base: str):
    """A PEFT LoRA adapter on a loaded model, not merged (PEFT runs its layers beside the base's), after the
    adapter gate (strict header, no pickle) and a check that it fits the base checkpoint `base`."""
    from upstack.checkpoint.adapter import check_adapter_matches, open_adapter

    found = open_adapter(adapter)
    if Path(base).is_dir():
        check_adapter_matches(found, open_checkpoint(base), str(base))
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, adapter, is_trainable=False).eval()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"cannot load adapter {adapter}: {_first_line(e)}") from None


# ------------------------------------------------------------------------------------------------
# Compatibility of tokenizers and models

def pad_token_id(tokenizer) -> int:
    """The pad id for batches: the tokenizer's pad token, else eos, else 0 (padding is never a label)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def check_token_ids(model, max_id: int, where: str = "the data") -> None:
    """Token ids must index the model's embedding table (a tokenizer/model mismatch otherwise fails deep
    inside the forward pass with an IndexError)."""
    n = model.get_input_embeddings().num_embeddings
    if max_id >= n:
        raise ConfigError(f"{where}: the tokenizer gives token id {max_id}, but the model's embedding table has "
                          f"{n} rows: the tokenizer does not belong to this model")


def same_tokenizer(a, b) -> bool:
    """Two loaded tokenizers split text the same way (same class, same vocabulary)."""
    return type(a).__name__ == type(b).__name__ and a.get_vocab() == b.get_vocab()


def check_same_vocab(model: str, other: str, what: str = "--ref-model") -> None:
    """Log-probs of two models are only comparable over the same vocabulary (checked from config.json)."""
    sizes = [(model_config(p) or {}).get("vocab_size") for p in (model, other)]
    if None in sizes:
        return  # a hub id: transformers will load it
    if sizes[0] != sizes[1]:
        raise ConfigError(f"{what} {other} has vocab_size {sizes[1]} but {model} has {sizes[0]}: the reference "
                          "must use the policy's tokenizer")


# ------------------------------------------------------------------------------------------------
# Model behaviour the batching relies on

def supports_packed_positions(model) -> bool:
    """True when restarting position_ids inside a row also stops attention at the restart.

    transformers' masking utilities turn position-id restarts into a block-diagonal causal mask (sdpa,
    eager, flex) or varlen kernels (flash attention) for models built on `create_causal_mask`, when the
    forward gets position_ids and no 2D attention mask. Other models would attend across documents.
    """
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3"):
        return False
    module = sys.modules.get(type(model).__module__)
    return bool(module and (hasattr(module, "create_causal_mask") or hasattr(module, "create_masks_for_generate")))


def disable_dropout(model) -> None:
    """Scoring the same sequences twice (DPO's policy and reference) must give the same log-probs: every
    `nn.Dropout` (subclasses too: LoRA's CpuDropout, train/lora_cpu.py) and attention dropout set to 0."""
    import torch.nn as nn

    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
        if isinstance(getattr(mod, "attention_dropout", None), float):
            mod.attention_dropout = 0.0


# ------------------------------------------------------------------------------------------------
# Batches: rows made of segments (documents or examples), each with its own positions and labels

def collate_segments(rows: list[list[tuple[Any, Any]]], pad_id: int, reset_positions: bool,
                     pad_to_multiple_of: int = 1) -> dict:
    """Rows of segments (token ids, label mask) -> a padded micro-batch of tensors.

    A label mask marks the tokens the model must learn to produce. Labels are shifted here: position t
    carries the id of token t+1 when token t+1 is a label token of the *same* segment, else -100, so no
    loss ever crosses a segment boundary. With `reset_positions`, position_ids restart at 0 in every
    segment and no 2D mask is passed, which transformers turns into attention that cannot cross
    segments (see supports_packed_positions); padding forms its own segment at the end of a row.
    Otherwise a 2D attention mask hides the padding and positions run through the row.
    `pad_to_multiple_of` rounds the width up: on a GPU every new width costs kernel selection (cuDNN
    attention builds a graph per shape), so fewer distinct widths run faster.
    """
    import numpy as np
    import torch

    lengths = [sum(len(ids) for ids, _ in row) for row in rows]
    width = -(-max(lengths) // pad_to_multiple_of) * pad_to_multiple_of
    n = len(rows)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), -100, dtype=np.int64)
    positions = np.zeros((n, width), dtype=np.int64) if reset_positions else None
    for r, row in enumerate(rows):
        at = 0
        for ids, mask in row:
            k = len(ids)
            input_ids[r, at:at + k] = ids
            if k > 1:
                nxt = np.asarray(ids[1:], dtype=np.int64)
                labels[r, at:at + k - 1] = np.where(np.asarray(mask[1:], dtype=bool), nxt, -100)
            if reset_positions:
                positions[r, at:at + k] = np.arange(k)
            at += k
        if reset_positions and at < width:
            positions[r, at:] = np.arange(width - at)
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}
    if reset_positions:
        batch["position_ids"] = torch.from_numpy(positions)
    elif min(lengths) < width:
        am = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
        batch["attention_mask"] = torch.from_numpy(am.astype(np.int64))
    batch["n_tokens"] = int(sum(lengths))
    has = labels != -100
    batch["n_loss"] = int(has.sum())
    # the first position any row predicts from: logits before it are never needed (forward_scored)
    batch["logits_from"] = int(has.any(axis=0).argmax()) if batch["n_loss"] else 0
    return batch


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on `device` (counts and other plain values as they are)."""
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# Scoring

def forward_logits(model, batch: dict, logits_from: int = 0):
    """The model's logits for a collated batch (the one forward call every stage uses); with
    `logits_from`, only for positions logits_from.. (the lm_head skips the rest)."""
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    if logits_from > 0:
        kwargs["logits_to_keep"] = batch["input_ids"].shape[1] - logits_from
    return model(**kwargs).logits


def _takes_logits_to_keep(model) -> bool:
    inner = getattr(model, "module", model)  # DDP and friends wrap the model
    if hasattr(inner, "get_base_model") and hasattr(inner, "peft_config"):
        inner = inner.get_base_model()  # PEFT passes keyword arguments through to the base model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def forward_scored(model, batch: dict):
    """(logits, labels) over the positions that can carry a label: prompts at the start of every row
    (SFT, DPO) need no logits, and the lm_head over a large vocabulary is a big share of the work."""
    start = _scored_from(model, batch)
    head = _output_head(model)
    if head is None:
        return forward_logits(model, batch, start), batch["labels"][:, start:]
    # The model applies its head to hidden[:, start:], a slice that is not one matrix in memory, on which
    # torch's matmul copies the head's whole weight once per row (forward and backward, whenever the hidden
    # states are already in the head's dtype); the head applied to the slice flattened into one matrix
    # reads its weight in place. It runs inside the model's forward, where a sharded (FSDP) model's
    # parameters are gathered.
    def flat_head(hidden):
        return head.__class__.forward(head, hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1)

    with _HeadAs(head, flat_head):
        logits = forward_logits(model, batch, start)
    return logits, batch["labels"][:, start:]


def _scored_from(model, batch: dict) -> int:
    start = batch.get("logits_from", 0)
    return start if start and _takes_logits_to_keep(model) else 0


# The loss never makes more than this many bytes of fp32 logits at once: the output head runs on chunks of
# positions (lm.token_nll; Mistral's 32k vocabulary x 4,096 tokens x batch 4 would be 2 GB of logits).
# Below one chunk the plain one-call path runs (nothing recomputed). On accelerators large chunks keep the
# head's matrix products large and the kernel launches few; on CPU small chunks cost no speed (measured:
# bench/lora.py's model, full and QLoRA, 8-32 MB chunks) and save the memory. UPSTACK_LOSS_CHUNK_MB
# overrides both (a number of MB, fractions allowed).
LOSS_CHUNK_BYTES = 256 << 20
LOSS_CHUNK_BYTES_CPU = 16 << 20


def loss_chunk_bytes(device_type: str | None = None) -> int:
    """UPSTACK_LOSS_CHUNK_MB when set (ConfigError when it is not a positive number), else
    LOSS_CHUNK_BYTES_CPU for a CPU run and LOSS_CHUNK_BYTES for any other device (and for GPU memory plans:
    device_type None)."""
    value = os.environ.get("UPSTACK_LOSS_CHUNK_MB", "").strip()
    if not value:
        return LOSS_CHUNK_BYTES_CPU if device_type == "cpu" else LOSS_CHUNK_BYTES
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if not mb > 0 or mb == float("inf"):
        raise ConfigError(f"UPSTACK_LOSS_CHUNK_MB={value!r}: expected a positive number of MB (default "
                          f"{LOSS_CHUNK_BYTES >> 20}, {LOSS_CHUNK_BYTES_CPU >> 20} on CPU)")
    return max(1, int(mb * (1 << 20)))


def _output_head(model):
    """The plain nn.Linear output head of a model whose logits are that head's output, else None."""
    import torch.nn as nn

    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model") and hasattr(inner, "peft_config"):
        inner = inner.get_base_model()
    config = getattr(inner, "config", None)
    if config is None or not hasattr(inner, "get_output_embeddings"):
        return None
    if not get_arch(config.to_dict(), allow_unknown=True).logits_are_head_output:
        return None
    head = inner.get_output_embeddings()
    return head if type(head) is nn.Linear else None


class _HeadAs:
    """Within the block the output head computes `fn(hidden)` instead of its logits: the model's own
    forward runs it (for FSDP, while the root's parameters are gathered) and returns it as `.logits`."""

    def __init__(self, head, fn):
        self.head, self.fn = head, fn

    def __enter__(self):
        self.head.forward = self.fn  # an instance attribute shadows nn.Linear.forward

    def __exit__(self, *exc):
        del self.head.forward


def loss_chunk_positions(model, batch: dict, chunk_bytes: int | None = None) -> int | None:
    """Positions per chunk of the loss's output head when the batch's fp32 logits would pass `chunk_bytes`
    (loss_chunk_bytes() for the batch's device by default); None when they fit in one chunk, or when the
    model's logits are not its head's plain output (soft-capping): then the plain one-call path runs."""
    chunk_bytes = chunk_bytes or loss_chunk_bytes(batch["input_ids"].device.type)
    head = _output_head(model)
    positions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - _scored_from(model, batch))
    if head is None or positions * head.out_features * 4 <= chunk_bytes:
        return None
    return max(1, chunk_bytes // (4 * head.out_features))


def token_nll(model, batch: dict, chunk_bytes: int | None = None):
    """(per-position negative log-likelihood [rows, positions], labels) over the scored positions. When the
    batch's logits would pass one chunk (loss_chunk_positions), the output head runs inside the model's
    forward a chunk of positions at a time and the backward pass recomputes one chunk's logits at a time
    (_head_nll): the batch's logits never exist at once. Same values and gradients as the plain path
    (F.cross_entropy on the model's logits, which runs below one chunk) up to float summation order."""
    import torch.nn.functional as F

    step = loss_chunk_positions(model, batch, chunk_bytes)
    if step is None:
        logits, labels = forward_scored(model, batch)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="none")
        return nll.view(labels.shape), labels
    head = _output_head(model)
    start = _scored_from(model, batch)
    labels = batch["labels"][:, start:]
    flat_labels = labels.flatten()

    def head_nll(hidden):   # run by the model's forward in place of its head (see _HeadAs)
        return _head_nll(hidden.flatten(0, 1), head.weight, head.bias, flat_labels, step)

    with _HeadAs(head, head_nll):
        nll = forward_logits(model, batch, start)
    return nll.view(labels.shape), labels


def _head_nll(hidden, weight, bias, labels, step: int, fp32_head_grad: bool | None = None):
    """Per-position NLL of `labels` under softmax(hidden @ weight.T + bias), computed `step` positions at a
    time (0 for positions labelled -100). Works like F.linear + F.cross_entropy (under autocast, in its
    dtype; the log-softmax in fp32), but keeps only each position's log-sum-exp for the backward pass,
    which recomputes one chunk's logits at a time and turns them into the gradient in place.

    The head's gradient is summed over the chunks in fp32. Each chunk's part is a matrix product of
    fp32 operands with `fp32_head_grad` (the default on CPU, where adding a bf16 product into fp32 takes a
    slow mixed-dtype pass), else (the default on every other device) a product in the compute dtype, as
    autocast's F.linear computes the head's gradient (bf16 tensor cores, fp32 accumulation inside the
    matmul, rounded once to bf16), then added to the fp32 sum: an fp32 product there would be a true-fp32
    matmul as large as the head's forward (nothing enables TF32)."""
    if fp32_head_grad is None:
        fp32_head_grad = hidden.device.type == "cpu"
    return _head_nll_fn().apply(hidden, weight, bias, labels, step, fp32_head_grad)


@functools.lru_cache(maxsize=None)
def _head_nll_fn():
    import torch
    import torch.nn.functional as F

    def compute_dtype(hidden, weight):
        device = hidden.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype

    class HeadNLL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, hidden, weight, bias, labels, step, fp32_head_grad):
            dtype = compute_dtype(hidden, weight)
            with torch.autocast(hidden.device.type, enabled=False):
                h, w = hidden.to(dtype), weight.to(dtype)
                b = None if bias is None else bias.to(dtype)
                keep = labels != -100
                target = torch.where(keep, labels, 0).unsqueeze(1)
                lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
                nll = torch.empty_like(lse)
                for a in range(0, h.shape[0], step):
                    z = F.linear(h[a:a + step], w, b).float()
                    torch.logsumexp(z, 1, out=lse[a:a + step])
                    torch.sub(lse[a:a + step], z.gather(1, target[a:a + step]).squeeze(1), out=nll[a:a + step])
                nll.masked_fill_(~keep, 0.0)
            ctx.save_for_backward(h, w, b, keep, target, lse)
            ctx.step, ctx.fp32_head_grad = step, fp32_head_grad
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            return nll

        @staticmethod
        def backward(ctx, grad):
            h, w, b, keep, target, lse = ctx.saved_tensors
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            step = ctx.step
            one = step >= h.shape[0]  # a single chunk
            scale = torch.where(keep, grad.float(), 0.0).unsqueeze(1)  # no gradient for unlabelled positions
            gh = torch.empty_like(h) if need_h else None
            gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w and not one else None
            gb = torch.zeros(b.shape, dtype=torch.float32, device=b.device) if need_b else None
            with torch.autocast(h.device.type, enabled=False):
                for a in range(0, h.shape[0], step):
                    ha = h[a:a + step]
                    p = F.linear(ha, w, b).float()
                    p.sub_(lse[a:a + step].unsqueeze(1)).exp_()                     # softmax
                    p.scatter_add_(1, target[a:a + step], torch.full_like(lse[a:a + step], -1.0).unsqueeze(1))
                    p.mul_(scale[a:a + step])                                        # d loss / d logits
                    d = p.to(w.dtype)
                    if need_h:
                        torch.mm(d, w, out=gh[a:a + step])
                    if need_w and one:  # the head's gradient as autocast's F.linear computes it
                        gw = d.t().mm(ha)
                    elif need_w and ctx.fp32_head_grad:  # summed over the chunks in fp32, of fp32 operands
                        gw.addmm_(p.t(), ha.float())
                    elif need_w:  # each chunk's product in the compute dtype, summed in fp32 (_head_nll)
                        gw.add_(d.t().mm(ha))
                    if need_b:
                        gb.add_(d.sum(0, dtype=torch.float32))
            hd, wd, bd = ctx.dtypes
            return (None if gh is None else gh.to(hd), None if gw is None else gw.to(wd),
                    None if gb is None else gb.to(bd), None, None, None)

    return HeadNLL


def scored_logps(model, batch: dict):
    """(summed log-prob of each row's label tokens, number of label tokens): `sequence_logps` of the
    model's logits, through `token_nll` so that large vocabularies are scored a chunk at a time."""
    nll, labels = token_nll(model, batch)
    return -nll.sum(-1), (labels != -100).sum(-1)


def sequence_logps(logits, labels):
    """(summed log-prob of each row's label tokens, number of label tokens) for shifted labels."""
    import torch.nn.functional as F

    per_token = -F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                 reduction="none").view(labels.shape)
    return per_token.sum(-1), (labels != -100).sum(-1)


def read_upstack_json(model_dir: str | Path) -> dict | None:
    """The provenance record (upstack.json) an upstack stage wrote into a checkpoint, if any."""
    path = Path(model_dir) / "upstack.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot parse ({e})") from None
