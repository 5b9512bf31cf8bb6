"""Saving: resumable checkpoints in `<out>.work/checkpoint-<step>/`, and the final model folder `out`."""

from __future__ import annotations

import json
import os
import shutil

from upstack.checkpoint import (
    TORCH_DTYPE_NAMES,
    copy_aux_files,
    merge_threads,
    normalize_dtype,
    open_adapter,
    open_checkpoint,
    plan_adapter_merge,
    resolve_model_dir,
    write_shards,
)
from upstack.config import config_to_dict
from upstack.lm import read_upstack_json
from upstack.outputs import atomic_output_dir, disk_full_error, is_disk_full
from upstack.train.lora import ADAPTER_DIR, parameter_count, peft_model_of
from upstack.train.metrics import trim_heap
from upstack.train.rng import apply_rng_state, read_rng_state, rng_file
from upstack.train.run import Run, list_checkpoints
from upstack.train.sharding import full_state_dict, load_sharded, save_sharded


def save_checkpoint(run: Run, step: int, extra: dict) -> None:
    """accelerate's save_state (model, optimizer, RNG; sharded under ZeRO-3) -- under upstack's FSDP,
    torch.distributed.checkpoint shards written by every rank plus each rank's RNG state -- + trainer_state.json,
    into checkpoint-<step>.tmp renamed at the end, so a crash mid-save never leaves a broken latest one.
    Any failure removes the partial folder; a full disk is one DiskFullError naming it and the space needed."""
    acc = run.accelerator
    final = run.work / f"checkpoint-{step}"
    tmp = run.work / f"checkpoint-{step}.tmp"
    if run.is_main and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    try:
        if run.sharding == "fsdp":
            save_sharded(tmp, run.rank, run.model, run.optimizer)
        else:
            acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if run.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **extra}, indent=2) + "\n")
    except BaseException as e:
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            raise disk_full_error(final, checkpoint_bytes(acc, run.model)) from None
        raise
    if run.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in list_checkpoints(run.work)[:-max(1, run.cfg.save_total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def load_checkpoint(run: Run, folder) -> None:
    """Model, optimizer and RNG states of a resumable checkpoint (save_checkpoint's inverse). The RNG files
    were checked when the resume point was chosen (run._check_rng_files); with --resume-ignore-rng and a
    bad one, the generators keep their seeded state (accelerate's load_state skips such a file itself)."""
    if run.sharding == "fsdp":
        load_sharded(folder, run.rank, run.model, run.optimizer)
        if run.rng_restorable:
            apply_rng_state(read_rng_state(rng_file(folder, run.rank, run.sharding)))
    else:
        run.accelerator.load_state(str(folder))


def checkpoint_bytes(acc, sharded_model=None) -> int:
    """About what one resumable checkpoint takes: the weights as held, plus two fp32 Adam moments per
    trained parameter (what save_state writes, RNG states aside)."""
    total = 0
    for model in [sharded_model] if sharded_model is not None else getattr(acc, "_models", []):
        for p in model.parameters():
            total += p.numel() * p.element_size() + (p.numel() * 8 if p.requires_grad else 0)
    return total


def _saved_bytes(model, save_dtype: str) -> int:
    """About what the final model takes on disk in `save_dtype`: every parameter, a QLoRA base's 4-bit
    weights by their unpacked count (lora.parameter_count: numel() of the packed storage is half of it)."""
    import torch

    size = torch.empty(0, dtype=getattr(torch, save_dtype)).element_size()
    return parameter_count(model) * size


def save_final(run: Run, model, tokenizer, summary: dict, *, input_dtype: str) -> dict:
    """The output folder: a plain HF checkpoint (safetensors, config, generation config, tokenizer)
    in the input's dtype (or --save-dtype), plus upstack.json carried forward, train_config.json,
    metrics.jsonl and TensorBoard logs; written atomically, then the work folder is removed.
    With --lora/--qlora: the PEFT adapter in OUT/adapter/, and (unless --adapter-only) the adapter merged
    into the base checkpoint on disk. Returns the summary with "out" and "save_dtype" added."""
    from accelerate.utils import DistributedType

    acc, cfg = run.accelerator, run.cfg
    save_dtype = TORCH_DTYPE_NAMES[normalize_dtype(cfg.save_dtype)] if cfg.save_dtype else input_dtype
    summary = {**summary, "out": str(run.out), "save_dtype": save_dtype, "stage": run.stage}
    acc.wait_for_everyone()
    peft = peft_model_of(acc.unwrap_model(model))
    if run.sharding == "fsdp":  # gathered from the shards: full tensors on rank 0 only (collective)
        state_dict = full_state_dict(model)
    elif acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        state_dict = acc.get_state_dict(model)
    else:
        state_dict = None
    if run.is_main:
        if peft is not None:
            summary["adapter"] = str(run.out / ADAPTER_DIR)
        run.metrics.write({"type": "summary", **{k: v for k, v in summary.items() if k != "data"}})
        run.metrics.close()
        need = _saved_bytes(acc.unwrap_model(model), save_dtype)
        with atomic_output_dir(run.out, overwrite=cfg.overwrite, need_bytes=need) as tmp:
            if peft is not None:
                _save_adapter_output(run, peft, tmp, save_dtype, state_dict)
            else:
                _save_full_model(acc.unwrap_model(model), tmp, save_dtype, state_dict)
            tokenizer.save_pretrained(tmp)
            _write_run_records(run, tmp)
        if not cfg.keep_checkpoints:
            shutil.rmtree(run.work, ignore_errors=True)
    acc.wait_for_everyone()
    return summary


def _save_full_model(unwrapped, folder, save_dtype: str, state_dict) -> None:
    import torch

    target = getattr(torch, save_dtype)
    if state_dict is not None:
        state_dict = {k: v.to(target) for k, v in _drop_tied_copies(unwrapped, state_dict).items()}
    else:
        unwrapped.to(target)
    unwrapped.save_pretrained(folder, state_dict=state_dict, max_shard_size="5GB")
    _write_config_dtype(folder / "config.json", save_dtype)


def _drop_tied_copies(model, state_dict: dict) -> dict:
    """A gathered state dict holds a tied weight under each of its names (embed_tokens and lm_head) as
    separate tensors, which save_pretrained cannot recognise as tied: keep the first name only, as a
    one-process save does."""
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            state_dict.pop(name, None)
        else:
            first[id(p)] = name
    return state_dict


def _save_adapter_output(run: Run, peft, folder, save_dtype: str, state_dict) -> None:
    """OUT/adapter/ in PEFT's format; then the base checkpoint with the adapter merged in, tensor by tensor
    (checkpoint's adapter plan and streaming writer), in `save_dtype`: never through a quantized copy."""
    cfg = run.cfg
    adapter_dir = folder / ADAPTER_DIR
    if state_dict is not None:  # gathered from shards: keep the adapter's entries, in PEFT's naming
        from peft import get_peft_model_state_dict

        state_dict = get_peft_model_state_dict(peft, state_dict=state_dict)
    peft.save_pretrained(adapter_dir, state_dict=state_dict, safe_serialization=True)
    _point_adapter_at_base(adapter_dir, cfg.model)
    if cfg.adapter_only:
        return
    release_weights(peft)  # the merge reads the base from disk: the trained copy is not needed any more
    base = open_checkpoint(resolve_model_dir(cfg.model))
    plans = plan_adapter_merge(base, open_adapter(adapter_dir), cfg.model, normalize_dtype(save_dtype))
    with merge_threads():
        write_shards(plans, folder, metadata={"upstack_merge": "lora-adapter"}, progress=cfg.progress,
                     label=str(run.out))
    copy_aux_files(base.folder, folder)
    config = dict(base.config)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_config_dtype(folder / "config.json", save_dtype)


def release_weights(model) -> None:
    """Free a model's weights and gradients (their tensors become empty) and hand the freed heap back to
    the system, so that what runs next (the adapter merge) does not add its memory to the training peak.
    The model is unusable afterwards."""
    import torch

    for p in model.parameters():
        p.grad = None
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
    trim_heap()


def _point_adapter_at_base(adapter_dir, model: str) -> None:
    """adapter_config.json names the base it was trained on as given (a folder or a hub id)."""
    path = adapter_dir / "adapter_config.json"
    conf = json.loads(path.read_text())
    conf["base_model_name_or_path"] = model
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def _write_config_dtype(conf_path, save_dtype: str) -> None:
    """config.json names the saved dtype as `dtype` (transformers' current key), not `torch_dtype`."""
    conf = json.loads(conf_path.read_text())
    conf["dtype"] = save_dtype
    conf.pop("torch_dtype", None)
    conf_path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def _write_run_records(run: Run, folder) -> None:
    """upstack.json carried forward from the input, train_config.json, metrics.jsonl and TensorBoard logs."""
    cfg = run.cfg
    meta = read_upstack_json(cfg.model)
    if meta is not None:
        (folder / "upstack.json").write_text(json.dumps(meta, indent=2) + "\n")
    (folder / "train_config.json").write_text(
        json.dumps({"stage": run.stage, **config_to_dict(cfg)}, indent=2, default=str) + "\n")
    shutil.copy2(run.work / "metrics.jsonl", folder / "metrics.jsonl")
    if (run.work / "tensorboard").is_dir():
        shutil.copytree(run.work / "tensorboard", folder / "tensorboard")
