"""The model being trained: loaded and checked against the data, prepared for the loop, and the LM loss."""

from __future__ import annotations

from upstack.errors import CheckpointError, ConfigError
from upstack.lm import (
    check_token_ids,
    checkpoint_dtype,
    load_model,
    load_model_skeleton,
    token_nll,
)
from upstack.train.config import TrainConfig, master_dtype
from upstack.train.layers import freeze_for_training
from upstack.train.lora import apply_lora, lora_enabled, quantization_config
from upstack.train.metrics import release_mapped_pages, trim_heap
from upstack.train.run import Run


def load_training_model(cfg: TrainConfig, max_token_id: int, run: Run) -> tuple:
    """(model in its master dtype, the checkpoint's own dtype name): the model --model names, checked to
    cover the data's largest token id; with --qlora its linear weights are quantized to 4-bit NF4 on load.
    Under FSDP only process 0 reads the weights: the others build the model on the meta device and receive
    their shards from it once the model is sharded (prepare_model), so a node's host memory holds one copy
    of the checkpoint, not one per process."""
    if weights_from_rank0(run) and not run.is_main:
        model = load_model_skeleton(cfg.model, dtype=master_dtype(cfg),
                                    attn_implementation=cfg.attn_implementation)
        check_token_ids(model, max_token_id)
        return model, checkpoint_dtype(cfg.model)
    try:
        model = load_model(cfg.model, dtype=master_dtype(cfg), attn_implementation=cfg.attn_implementation,
                           quantization_config=quantization_config(cfg))
    except CheckpointError as e:
        if cfg.qlora:
            raise CheckpointError(f"--qlora: {e} (bitsandbytes could not quantize the model on this device; "
                                  "--lora trains the same adapters on the full-precision base)") from None
        raise
    if cfg.qlora:
        trim_heap()  # the quantization's bf16 temporaries, freed but still held by the allocator
        release_mapped_pages(cfg.model)  # the bf16 pages the 4-bit weights were quantized from
    input_dtype = checkpoint_dtype(cfg.model)
    check_token_ids(model, max_token_id)
    return model, input_dtype


def weights_from_rank0(run: Run) -> bool:
    """Under FSDP with several processes only process 0 reads a checkpoint (see load_training_model)."""
    return run.sharding == "fsdp" and run.world > 1


def load_on_rank0(run: Run, path: str, dtype: str, attn_implementation=None):
    """A checkpoint's model: read by process 0; on the meta device elsewhere when weights_from_rank0 (the
    weights arrive with shard_from_rank0); read by every process otherwise."""
    if weights_from_rank0(run) and not run.is_main:
        return load_model_skeleton(path, dtype=dtype, attn_implementation=attn_implementation)
    return load_model(path, dtype=dtype, attn_implementation=attn_implementation)


def shard_from_rank0(run: Run, model):
    """fully_shard the model (train/sharding.py); when weights_from_rank0, then fill every process's shards
    from process 0's weights. Collective."""
    from upstack.train.sharding import shard_model

    if not weights_from_rank0(run):
        return shard_model(model, run.accelerator.device)
    full_state = model.state_dict() if run.is_main else None
    model = shard_model(model, run.accelerator.device)
    _materialize_from_rank0(model, full_state, run.accelerator.device)
    return model


def _materialize_from_rank0(model, full_state: dict | None, device) -> None:
    """After sharding: parameters still on the meta device get real (empty) storage, buffers keep their
    values, then process 0's full state dict is broadcast into every process's shards. Collective."""
    import torch
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    if any(p.device.type == "meta" for p in model.parameters()):
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        model.to_empty(device=device)
        with torch.no_grad():
            for name, value in buffers.items():
                model.get_buffer(name).copy_(value)
    set_model_state_dict(model, full_state or {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def trainable_model(model, cfg: TrainConfig) -> tuple:
    """(the model to train, run info): LoRA adapters on a frozen base with --lora/--qlora (in the layers
    --train-layers selects), else the base itself with only --train-layers' parameters trainable."""
    if lora_enabled(cfg):
        return apply_lora(model, cfg, cfg.model)
    return model, freeze_for_training(model, cfg.train_layers, cfg.model)


def _enable_gradient_checkpointing(model) -> None:
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def build_optimizer(cfg: TrainConfig, model):
    """AdamW over the trainable parameters only; no weight decay on vectors (norms, biases)."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("train_layers: nothing to train (every parameter is frozen)")
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon)


def prepare_model(run: Run, model):
    """Gradient checkpointing, then either upstack's FSDP2 (every decoder layer and the root sharded, the
    optimizer over the shards, only the optimizer given to accelerate: no DDP wrapper) or accelerate.prepare
    (DDP, DeepSpeed, one process). Records how the run is distributed in run.info: sharding, processes,
    params_local (parameter elements this process holds)."""
    import os

    from accelerate.utils import DistributedType

    cfg = run.cfg
    if cfg.gradient_checkpointing or (run.sharding == "fsdp" and
                                      os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true"):
        _enable_gradient_checkpointing(model)
    model.train()
    if run.sharding == "fsdp":
        from upstack.train.sharding import local_numel

        model = shard_from_rank0(run, model)
        optimizer = run.accelerator.prepare(build_optimizer(cfg, model))  # steps only on sync micro-batches
        run.model, run.optimizer = model, optimizer
        run.info.update({"sharding": "fsdp", "processes": run.world, "params_local": local_numel(model),
                         "weights_from_rank0": weights_from_rank0(run)})
        return model, optimizer
    optimizer = build_optimizer(cfg, model)
    if run.accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed wants the micro-batch size, which it would otherwise read from a prepared DataLoader.
        run.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    model, optimizer = run.accelerator.prepare(model, optimizer)
    run.info.update({"sharding": run.sharding, "processes": run.world,
                     "params_local": sum(p.numel() for p in model.parameters())})
    return model, optimizer


def lm_loss(model, batch: dict):
    """Summed next-token cross-entropy over the batch's label tokens (labels are already shifted); the
    output head runs a chunk of positions at a time when the batch's logits would pass one chunk
    (lm.token_nll)."""
    nll, _ = token_nll(model, batch)
    return nll.sum(), {}
