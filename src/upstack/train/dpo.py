"""`upstack dpo`: Direct Preference Optimization against a frozen reference model.

Pairs (`{"prompt": [...], "chosen": [...], "rejected": [...]}`) are rendered with the chat template;
the completion tokens of each side carry labels (chat.py). A micro-batch of b pairs is one forward pass
over 2b rows (chosen rows, then rejected rows). Sequence log-probs are sums over completion tokens.

The reference is the starting model unless --ref-model names another. With --precompute-ref (the
default) its log-probs are computed once before training -- from the policy itself before its first
update when the reference is the starting model, so no second copy is ever loaded -- and stored in
`<out>.work/ref_logps.safetensors` for --resume. Without it the reference model stays in memory and
scores every batch.

Losses (per pair; d = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))):
    sigmoid  -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d)        (DPO; eps = label smoothing)
    hinge    max(0, 1 - beta d)                                               (SLiC)
    ipo      (d' - 1 / (2 beta))^2, d' with log-probs averaged per token      (IPO, as TRL computes it)
Rewards: beta (log pi - log ref) per side; margin = chosen - rejected; accuracy = share with chosen > rejected.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

from upstack.data.chat import TEMPLATES, encode_pairs
from upstack.data.loading import load_dpo_rows
from upstack.errors import ConfigError, DataError
from upstack.lm import (
    check_model_path,
    check_same_vocab,
    collate_segments,
    disable_dropout,
    pad_token_id,
    scored_logps,
)
from upstack.outputs import atomic_file
from upstack.train.checkpointing import save_final
from upstack.train.config import (
    TrainConfig,
    check_config,
    master_dtype,
    train_and_eval_specs,
)
from upstack.train.inputs import load_chat_data
from upstack.train.loop import Task, train_loop
from upstack.train.lora import AdapterDisabled, lora_enabled
from upstack.train.model import (
    load_on_rank0,
    load_training_model,
    prepare_model,
    shard_from_rank0,
    trainable_model,
)
from upstack.train.run import Run, identity_key, seed_everything, start_run
from upstack.train.schedule import (
    EpochOrder,
    fit_batch_to_items,
    global_batch_size,
    total_steps,
)

log = logging.getLogger("upstack.train")

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


@dataclass
class DPOConfig(TrainConfig):
    learning_rate: float = 5e-7
    max_length: int = 1024
    beta: float = 0.1
    loss_type: str = "sigmoid"          # sigmoid (DPO) | ipo | hinge
    label_smoothing: float = 0.0        # sigmoid only: assumed share of flipped preference labels
    rpo_alpha: float = 0.0              # weight of the chosen answers' NLL added to the loss (RPO / IRPO)
    ref_model: Optional[str] = None     # None: the starting model
    precompute_ref: bool = True         # score the reference once before training, then free it
    template: str = "auto"              # as for sft


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0, chosen_tokens=None, rejected_tokens=None):
    """Per-pair DPO-family losses from summed sequence log-probs (tensors of shape [pairs])."""
    import torch
    import torch.nn.functional as F

    if loss_type == "ipo":
        d = (policy_chosen - ref_chosen) / chosen_tokens.clamp(min=1) - \
            (policy_rejected - ref_rejected) / rejected_tokens.clamp(min=1)
        return (d - 1.0 / (2.0 * beta)) ** 2
    d = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        return -(1.0 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)
    if loss_type == "hinge":
        return torch.relu(1.0 - beta * d)
    raise ConfigError(f"loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def pair_loss(model, batch: dict, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
              ref_model=None, rpo_alpha: float = 0.0):
    """(summed loss over the batch's pairs, summed statistics) for a collated pair batch: rows 0..n-1 are
    the chosen sequences, rows n..2n-1 the rejected ones; reference log-probs come from
    batch["ref_logps"] ([n, 2], precomputed) or from `ref_model`. With `rpo_alpha`, each pair's loss
    also gets rpo_alpha * the chosen answer's mean per-token negative log-likelihood (RPO, as in Pang
    et al. 2024, "Iterative Reasoning Preference Optimization"): it keeps DPO from lowering the
    likelihood of the chosen answers along with the rejected ones."""
    import torch

    logps, n_tok = scored_logps(model, batch)
    n = batch["n_loss"]
    pc, pr = logps[:n], logps[n:]
    if batch.get("ref_logps") is not None:
        rc, rr = batch["ref_logps"][:, 0], batch["ref_logps"][:, 1]
    else:
        with torch.no_grad():
            ref_lp, _ = scored_logps(ref_model, batch)
        rc, rr = ref_lp[:n], ref_lp[n:]
    losses = dpo_losses(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                        chosen_tokens=n_tok[:n], rejected_tokens=n_tok[n:])
    nll = -pc / n_tok[:n].clamp(min=1)
    if rpo_alpha:
        losses = losses + rpo_alpha * nll
    with torch.no_grad():
        chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
        stats = {"rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
                 "rewards/accuracy": (chosen_r > rejected_r).float().sum(),
                 "logps/chosen": pc.sum(), "logps/rejected": pr.sum(), "nll/chosen": nll.sum()}
    return losses.sum(), stats


def _prepare_reference(run: Run, ref):
    """A frozen model for scoring: sharded like the policy under upstack's FSDP (every process runs the same
    forward passes, so its all-gathers line up), DeepSpeed's inference wrapper (TRL's helper), else the device."""
    from accelerate.utils import DistributedType

    ref.eval()
    ref.requires_grad_(False)
    disable_dropout(ref)
    if run.sharding == "fsdp":
        return shard_from_rank0(run, ref)
    if run.accelerator.distributed_type == DistributedType.DEEPSPEED:
        from trl.models import prepare_deepspeed

        return prepare_deepspeed(ref, run.accelerator)
    return ref.to(run.accelerator.device)  # no gradients, so no DDP wrapper (and no slot in save_state)


def _load_reference(run: Run, ref_path: str):
    """The reference model, in the policy's master dtype, prepared for scoring."""
    cfg = run.cfg
    return _prepare_reference(run, load_on_rank0(run, ref_path, master_dtype(cfg), cfg.attn_implementation))


def score_pairs(run: Run, model, pair_ids: list[int], collate):
    """Reference log-probs [len(pair_ids), 2] (chosen, rejected), shared out over processes; every process
    runs the same number of forward passes (collective under FSDP/ZeRO-3) and all get the full result."""
    import torch
    from tqdm import tqdm

    world, rank = run.world, run.rank
    b = max(1, run.cfg.batch_size * 2)
    per_rank = math.ceil(len(pair_ids) / world)
    mine = pair_ids[rank::world]
    out = torch.zeros(per_rank, 2, dtype=torch.float32, device=run.accelerator.device)
    was_training = model.training
    model.eval()
    n_batches = math.ceil(per_rank / b)
    with torch.no_grad():
        for i in tqdm(range(n_batches), desc="reference log-probs", disable=not (run.cfg.progress and run.is_main),
                      leave=False):
            idx = mine[i * b:(i + 1) * b]
            batch = collate(idx or pair_ids[:1], with_ref=False)
            batch = {k: (v.to(run.accelerator.device) if hasattr(v, "to") else v) for k, v in batch.items()}
            with run.accelerator.autocast():
                logps, _ = scored_logps(model, batch)
            if idx:
                n = len(idx)
                out[i * b:i * b + n, 0] = logps[:n].float()
                out[i * b:i * b + n, 1] = logps[n:].float()
    model.train(was_training)
    gathered = run.accelerator.gather(out) if world > 1 else out  # [world * per_rank, 2], rank-major
    gathered = gathered.cpu()
    result = torch.empty(len(pair_ids), 2)
    for j in range(len(pair_ids)):
        result[j] = gathered[(j % world) * per_rank + j // world]
    return result


def check_dpo_config(cfg: DPOConfig) -> None:
    """The shared checks, then DPO's own options (values only: the pipeline runs this before any stage)."""
    check_config(cfg)
    problems = []
    if cfg.loss_type not in LOSS_TYPES:
        problems.append(f"loss_type: {cfg.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    if not cfg.beta > 0:
        problems.append(f"beta: must be > 0, got {cfg.beta}")
    if not 0 <= cfg.label_smoothing < 0.5:
        problems.append(f"label_smoothing: must be in [0, 0.5), got {cfg.label_smoothing}")
    if not cfg.rpo_alpha >= 0:
        problems.append(f"rpo_alpha: must be >= 0, got {cfg.rpo_alpha}")
    if cfg.label_smoothing and cfg.loss_type != "sigmoid":
        problems.append("label_smoothing applies to loss_type sigmoid only")
    if cfg.template not in TEMPLATES:
        problems.append(f"template: {cfg.template!r} is not one of {', '.join(TEMPLATES)}")
    if problems:
        raise ConfigError("; ".join(problems))


def dpo(cfg: DPOConfig) -> dict:
    """Run DPO; returns the summary (final loss, rewards, margins, accuracy; eval metrics; out path)."""
    check_dpo_config(cfg)
    if cfg.ref_model:
        check_model_path(cfg.ref_model, "--ref-model")
        check_same_vocab(cfg.model, cfg.ref_model)
    specs, eval_specs = train_and_eval_specs(cfg)
    with start_run(cfg, "dpo") as run:
        seed_everything(cfg.seed)

        def check(rows, pairs, stats):
            if stats["truncated"] and run.is_main:
                log.warning(f"{stats['truncated']} of {2 * len(rows)} sequences were longer than --max-length "
                            f"{cfg.max_length} and were truncated (longest: {stats['longest']} tokens); "
                            f"{stats['pairs_dropped']} pairs lost a whole completion and were dropped")
            if not pairs:
                raise DataError(f"no preference pairs left: all {len(rows)} lost a completion to --max-length "
                                f"{cfg.max_length}")

        data = load_chat_data(run, specs, eval_specs, load_dpo_rows, encode_pairs, check)
        enc, pairs, eval_enc, eval_pairs, stats = data.enc, data.items, data.eval_enc, data.eval_items, data.stats
        model, input_dtype = load_training_model(cfg, data.max_token_id(), run)
        model, layers = trainable_model(model, cfg)
        disable_dropout(model)  # after the adapters are in place: LoRA's dropout too
        pad_id = pad_token_id(data.tokenizer)
        ref_logps = {"train": None, "eval": None}

        def make_collate(encoded, pair_list, split):
            def collate(idx, with_ref=True):
                seqs = [pair_list[i][0] for i in idx] + [pair_list[i][1] for i in idx]
                batch = collate_segments([[encoded.get(s)] for s in seqs], pad_id, False, run.pad_multiple)
                batch["n_loss"] = len(idx)
                if with_ref and ref_logps[split] is not None:
                    batch["ref_logps"] = ref_logps[split][idx]
                return batch
            return collate

        collate = make_collate(enc, pairs, "train")
        eval_collate = make_collate(eval_enc, eval_pairs, "eval")
        run.info.update({"template": data.template, "pairs": len(data.rows), "train_pairs": len(pairs),
                         "eval_pairs": len(eval_pairs), "truncated": stats["truncated"],
                         "pairs_dropped": stats["pairs_dropped"], "loss_type": cfg.loss_type, "beta": cfg.beta,
                         "precompute_ref": cfg.precompute_ref,
                         "skipped_rows": stats["skipped"] + sum(s.skipped for s in data.report.sources), **layers})

        fit_batch_to_items(cfg, len(pairs), run.world, "pairs", run.warn)
        model, optimizer = prepare_model(run, model)
        ref_model = None
        ref_path = cfg.ref_model or cfg.model
        if cfg.precompute_ref:
            t0 = time.perf_counter()
            ref_logps.update(_reference_logps(run, model, ref_path, collate, eval_collate, len(pairs),
                                              len(eval_pairs)))
            run.info["ref_logps_seconds"] = time.perf_counter() - t0
        elif lora_enabled(cfg) and not cfg.ref_model:
            ref_model = AdapterDisabled(model)  # the starting model is the policy without its adapter
        else:
            ref_model = _load_reference(run, ref_path)

        def loss_fn(m, batch):
            return pair_loss(m, batch, beta=cfg.beta, loss_type=cfg.loss_type,
                             label_smoothing=cfg.label_smoothing, ref_model=ref_model, rpo_alpha=cfg.rpo_alpha)

        task = Task(n_items=len(pairs), collate=collate, loss_fn=loss_fn, n_eval=len(eval_pairs),
                    eval_collate=eval_collate, derive=_margin)
        summary = train_loop(run, model, optimizer, task)
        summary.update({k: run.info[k] for k in ("template", "train_pairs", "eval_pairs", "truncated",
                                                   "pairs_dropped", "skipped_rows", "ref_logps_seconds")
                        if k in run.info})
        summary["data"] = data.report.to_dict()
        return save_final(run, model, data.tokenizer, summary, input_dtype=input_dtype)


def _reference_logps(run: Run, model, ref_path: str, collate, eval_collate, n_train: int, n_eval: int) -> dict:
    """Reference log-probs for the pairs training will use (and all eval pairs), cached in the work folder.

    When the reference is the starting model and no update has happened yet (a fresh run), the policy
    scores them itself; otherwise (another --ref-model, or a resume whose cache is missing) the reference
    is loaded, scored and freed."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = run.cfg
    path = run.work / "ref_logps.safetensors"
    key = identity_key(run.identity)  # model, reference, data files, template, max_length, seed, ...
    if path.is_file():
        cached = load_file(str(path))
        if (_cache_key(path) == key and cached["train"].shape[0] == n_train
                and cached.get("eval", torch.zeros(0, 2)).shape[0] == n_eval):
            run.log(f"reference log-probs from {path}")
            return {"train": cached["train"], "eval": cached.get("eval")}
        run.log(f"{path} was scored for other inputs or options; scoring again")
    steps = total_steps(cfg, n_train, run.world)
    used = sorted(set(EpochOrder(n_train, cfg.seed).take(0, steps * global_batch_size(cfg, run.world))))
    if run.resume_from is not None and not cfg.ref_model:
        log.warning("the reference log-prob cache is missing; scoring with the starting model")
    own = not cfg.ref_model and run.resume_from is None
    in_place = not cfg.ref_model and lora_enabled(cfg)  # the policy with its adapter switched off
    if own:
        scorer = model
    elif in_place:
        scorer = AdapterDisabled(model)
    else:
        scorer = _load_reference(run, ref_path)
    which = " (the starting policy)" if own else " (the policy without its adapter)" if in_place else " " + ref_path
    run.log(f"scoring {len(used)} training and {n_eval} eval pairs with the reference model{which}")
    train = torch.zeros(n_train, 2)
    if used:
        train[used] = score_pairs(run, scorer, used, collate)
    result = {"train": train}
    if n_eval:
        result["eval"] = score_pairs(run, scorer, list(range(n_eval)), eval_collate)
    if not (own or in_place):
        del scorer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if run.is_main:
        with atomic_file(path) as tmp:
            save_file({k: v.contiguous() for k, v in result.items()}, str(tmp), metadata={"key": key})
    run.accelerator.wait_for_everyone()
    return {"train": result["train"], "eval": result.get("eval")}


def _cache_key(path) -> str | None:
    """The inputs key a reference log-prob file was written with (None for one written before keys)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get("key")


def _margin(metrics: dict, prefix: str) -> dict:
    c, r = metrics.get(f"{prefix}rewards/chosen"), metrics.get(f"{prefix}rewards/rejected")
    return {f"{prefix}rewards/margin": c - r} if c is not None and r is not None else {}
