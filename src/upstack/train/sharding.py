"""Sharded training: upstack applies PyTorch's FSDP2 (`fully_shard`) itself, the same way on CPU processes
(gloo) and GPUs (nccl), as torchtitan and torchtune do.

How it is turned on: the launch asks for FSDP. Either the accelerate config says `distributed_type: FSDP`
(`accelerate launch` then sets ACCELERATE_USE_FSDP=true in every process), or the environment sets
UPSTACK_SHARDING=fsdp (for torchrun or any other launcher). With more than one process, upstack then

- tells accelerate *not* to handle FSDP (ACCELERATE_USE_FSDP=false in the process, UPSTACK_SHARDING=fsdp
  remembered): accelerate 1.15 cannot shard on CPU processes, and on GPUs its FSDP wrapper would do what
  upstack does here, differently. The Accelerator stays a plain multi-process one (MULTI_CPU / MULTI_GPU)
  for devices, the process group, autocast, gradient-accumulation bookkeeping and collectives; the model
  is never given to `accelerator.prepare`, so it is never wrapped in DDP;
- builds a 1-D device mesh over all processes and calls `fully_shard` on every decoder layer, then on the
  root model (embeddings, final norm and head), before the optimizer is built over the sharded (DTensor)
  parameters: every process holds 1/N of the parameters, gradients and AdamW state; gradients are
  reduce-scattered (averaged) by FSDP in each backward pass;
- clips gradients over the DTensor gradients (one global norm), gathers the full weights on rank 0 for
  the final Hugging Face checkpoint (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`), and
  saves resumable checkpoints with torch.distributed.checkpoint: each rank writes its own shards (model
  and optimizer) plus its RNG state.

A launch that asks for FSDP but would run unsharded (one process; --qlora, whose 4-bit weights FSDP2
cannot shard) is refused before any work (ConfigError, exit 2): never a silent fallback to DDP.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

from upstack.errors import ConfigError

ENV = "UPSTACK_SHARDING"          # fsdp: shard with FSDP2 (set by the user, or from accelerate's FSDP launch)
SHARDED_DIR = "sharded"           # checkpoint-N/sharded: torch.distributed.checkpoint files (model, optim)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def requested() -> str:
    """'fsdp' when the launch asks for FSDP (UPSTACK_SHARDING=fsdp, or accelerate's ACCELERATE_USE_FSDP),
    'deepspeed' for an accelerate DeepSpeed launch, else 'none'."""
    value = os.environ.get(ENV, "").strip().lower()
    if value not in ("", "none", "fsdp"):
        raise ConfigError(f"{ENV}={value!r}: use fsdp (or none)")
    if value == "fsdp" or _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "none"


def take_fsdp_from_accelerate() -> None:
    """An FSDP launch is upstack's to shard: accelerate (and transformers' loading) must not do FSDP, or on
    CPU it reports one process per rank (DistributedType.NO). Call before creating accelerate's state."""
    if requested() == "fsdp":
        os.environ[ENV] = "fsdp"                      # remembered for the next stage of this process
        os.environ["ACCELERATE_USE_FSDP"] = "false"


def check_fsdp(cfg) -> bool:
    """True when this run shards with FSDP2; a launch that asks for it but cannot have it is refused here,
    before anything is loaded. Also takes FSDP away from accelerate (see the module doc)."""
    if requested() != "fsdp":
        return False
    check_fsdp_values(cfg, world_size())
    take_fsdp_from_accelerate()
    return True


def check_fsdp_values(cfg, n: int) -> None:
    """What refuses an FSDP launch of `n` processes (values only)."""
    if n <= 1:
        raise ConfigError("the launch asks for FSDP but runs 1 process: nothing to shard over (launch 2 or more "
                          f"processes, e.g. configs/accelerate/fsdp-cpu2.yaml, or unset {ENV} / use a non-FSDP "
                          "accelerate config)")
    if getattr(cfg, "qlora", False):
        raise ConfigError("--qlora under FSDP: FSDP2 cannot shard bitsandbytes' packed 4-bit weights; use --lora "
                          "(adapters on the full-precision base shard fine) or launch without FSDP")


def ensure_process_group(device_type: str) -> None:
    """The default process group (gloo on CPU, nccl on CUDA) when the launcher's env is there and accelerate
    has not made one."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def _mesh(device_type: str):
    from torch.distributed.device_mesh import init_device_mesh

    ensure_process_group(device_type)
    import torch.distributed as dist

    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def shard_model(model, device) -> Any:
    """fully_shard every decoder layer, then the root; parameters become DTensors sharded on dim 0 over all
    processes, moved to `device`. The FSDP_* settings of an accelerate FSDP config that apply here are
    honoured: fsdp_reshard_after_forward (default true), fsdp_offload_params (CUDA only)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    from upstack.train.layers import decoder_layers

    device_type = getattr(device, "type", str(device))
    mesh = _mesh(device_type)
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() not in ("false", "0", "no")
    offload = CPUOffloadPolicy() if device_type == "cuda" and _flag("FSDP_OFFLOAD_PARAMS") else OffloadPolicy()
    prefix, n = decoder_layers(model)
    layers = model.get_submodule(prefix)
    for i in range(n):
        fully_shard(layers[i], mesh=mesh, reshard_after_forward=reshard, offload_policy=offload)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, offload_policy=offload)
    return model


def local_numel(model) -> int:
    """Parameter elements this process holds: the local shards of DTensors, whole plain tensors."""
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())


def clip_grad_norm_(params: list, max_norm: float):
    """Clip to one global L2 norm over (DTensor) gradients; returns the norm before clipping (a plain tensor)."""
    import torch
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    meshes = {g.device_mesh for g in grads if isinstance(g, DTensor)}
    for mesh in meshes:
        group = [p for p in params if isinstance(p.grad, DTensor) and p.grad.device_mesh == mesh]
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, DTensor.from_local(total, mesh))
    plain = [p for p in params if p.grad is not None and not isinstance(p.grad, DTensor)]
    if plain:
        torch.nn.utils.clip_grads_with_norm_(plain, max_norm, total)
    return total


def full_state_dict(model) -> dict:
    """The full (unsharded) weights on rank 0, on CPU; {} on the other ranks. Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def _states(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, _inner(optimizer))}


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_sharded(folder: Path, rank: int, model, optimizer) -> None:
    """Model and optimizer shards (torch.distributed.checkpoint, one file per rank + .metadata) and this
    rank's RNG state, into `folder` (collective: every rank calls it)."""
    import torch
    import torch.distributed.checkpoint as dcp

    target = Path(folder) / SHARDED_DIR
    target.mkdir(parents=True, exist_ok=True)
    dcp.save(_states(model, optimizer), checkpoint_id=str(target))
    torch.save(_rng_state(), Path(folder) / f"rng_state_{rank}.pt")


def load_sharded(folder: Path, rank: int, model, optimizer) -> None:
    """The inverse of save_sharded (collective), but for the RNG state, which checkpointing.load_checkpoint
    restores once it is known to be usable. DCP would reshard to another process count, but a resume
    with another count is refused earlier by the run identity (the data order per process differs)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    states = _states(model, optimizer)
    dcp.load(states, checkpoint_id=str(Path(folder) / SHARDED_DIR))
    set_model_state_dict(model, states["model"])
    set_optimizer_state_dict(model, _inner(optimizer), states["optim"])


def launch_plan(cfg) -> dict:
    """How the launch this process runs under would distribute a run, for --dry-run (nothing started):
    {"sharding", "processes", "note"}; "refused" with the reason where the run would be refused."""
    sharding, n = requested(), world_size()
    plan = {"sharding": sharding if sharding != "none" else ("ddp" if n > 1 else "none"), "processes": n}
    if sharding == "fsdp":
        try:
            check_fsdp_values(cfg, n)
            plan["note"] = ("upstack's FSDP2: every decoder layer and the root sharded over the processes "
                            "(parameters, gradients, optimizer state: about 1/N each)")
        except ConfigError as e:
            plan["refused"] = str(e)
    elif sharding == "deepspeed":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "?")
        plan["zero_stage"] = int(stage) if stage.isdigit() else stage
        plan["note"] = (f"accelerate's DeepSpeed ZeRO-{stage} (needs the deepspeed package and CUDA GPUs); "
                        "ZeRO-3 partitions like FSDP, so the FSDP GPU counts apply")
    return plan
