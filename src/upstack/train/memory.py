"""The memory plan of a training stage: how much accelerator memory full, LoRA and QLoRA training need at
the stage's batch, length and dtype, and how many GPUs of a given size each needs under FSDP.

Counts come from the model's config (built on the meta device: exact parameter counts, no weights read).
The formula (bytes; P parameters, L_lin of them in the decoder layers' linear modules, A adapter
parameters, w the bytes of a master weight: 4 for fp32 and bf16-mixed, 2 for bf16):

    full    weights P w + gradients P w + AdamW moments 2 P w
    lora    base weights P b (frozen; b = 2 under bf16 and bf16-mixed, whose frozen base needs no fp32
            master copy, 4 under fp32) + adapters (fp32 weights, gradients, two moments) 16 A
    qlora   linear weights in NF4 with double quantization 0.516 L_lin + the other (frozen) weights in
            bf16 2 (P - L_lin) + 16 A
    activations, per process: tokens x layers x (6 h + 2 kv + 4 i) x a_bytes (a_bytes: 4 for fp32, 2 for
            bf16 and bf16-mixed; h hidden, kv key/value width, i MLP width; with gradient checkpointing
            tokens x layers x h + one layer's worth); + attention scores 2 x heads x length per token and
            layer with eager attention; + embeddings and the final norm, 2 tokens h a_bytes
    logits  3 x tokens x vocab x 4 (a chunk's logits in the compute dtype and in fp32, their gradient); the
            loss never makes more than lm.loss_chunk_bytes() of fp32 logits at once (256 MB on a GPU),
            so this part is capped at 3 x that
    lora    with --lora-dropout > 0, activations also hold the dropped copy and mask of each adapted
            module's input: tokens x (summed input width of the adapted modules) x (a_bytes + 1) (one layer's
            share of it with gradient checkpointing)
    DPO     tokens count chosen and rejected; a reference held in memory (--no-precompute-ref) adds P w
            for full training (LoRA's reference is the policy with its adapter off: nothing more)

Under FSDP with N processes the weights, gradients and optimizer states are sharded (divided by N); the
activations and logits are per process. A GPU of G bytes fits a plan when the plan is at most
0.9 G - 1 GiB (CUDA context, allocator fragmentation, kernels' workspace).
"""

from __future__ import annotations

from typing import Optional

from upstack.checkpoint import meta_model
from upstack.errors import ConfigError
from upstack.lm import loss_chunk_bytes
from upstack.train.lora import ALL_LINEAR, lora_enabled, lora_target_names, rank_problem

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)   # 4-bit values + 8-bit absmax per 64 + fp32 per 256 absmax blocks
GIB = 1 << 30
METHODS = ("full", "lora", "qlora")


def _dims(config: dict) -> tuple[int, int, int, int, int, int]:
    """(hidden, kv width, MLP width, layers, heads, vocab) of a decoder-only config."""
    cfg = config.get("text_config") or config
    h = cfg["hidden_size"]
    heads = cfg.get("num_attention_heads") or 1
    head_dim = cfg.get("head_dim") or h // heads
    kv = (cfg.get("num_key_value_heads") or heads) * head_dim
    i = cfg.get("intermediate_size") or 4 * h
    return h, kv, i, cfg["num_hidden_layers"], heads, cfg["vocab_size"]


def parameter_counts(config: dict, lora_r: int, lora_targets=None) -> dict:
    """{"total": P, "layer_linear": L_lin, "adapter": A, "adapter_inputs": the summed input width of the
    adapted modules, "shapes": {name: (in, out)} of the modules --lora-targets names (all of them for
    all-linear or None)} from the config (meta device, no memory)."""
    import torch.nn as nn

    try:
        model = meta_model(config)
    except Exception as e:  # transformers raises several types for configs it cannot build
        raise ConfigError(f"cannot build the model of this config.json to count its parameters "
                          f"({type(e).__name__}: {e})") from None
    head = model.get_output_embeddings()
    total = sum(p.numel() for p in model.parameters())
    wanted = set(lora_target_names(lora_targets)) if lora_targets is not None else {ALL_LINEAR}
    lin = adapter = inputs = 0
    shapes = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head:
            lin += mod.weight.numel()
            adapter += lora_r * (mod.in_features + mod.out_features)
            inputs += mod.in_features
            if ALL_LINEAR in wanted or name.rsplit(".", 1)[-1] in wanted:
                shapes[name] = (mod.in_features, mod.out_features)
    return {"total": total, "layer_linear": lin, "adapter": adapter, "adapter_inputs": inputs, "shapes": shapes}


def activation_bytes(config: dict, tokens: int, *, a_bytes: int, gradient_checkpointing: bool,
                     eager_attention: bool = False, max_length: int = 0) -> int:
    h, kv, i, layers, heads, _ = _dims(config)
    per_layer = 6 * h + 2 * kv + 4 * i + (2 * heads * max_length if eager_attention else 0)
    if gradient_checkpointing:
        kept = tokens * (layers * h + per_layer)
    else:
        kept = tokens * layers * per_layer
    return (kept + 2 * tokens * h) * a_bytes


def logits_bytes(config: dict, tokens: int) -> int:
    vocab = _dims(config)[5]
    return 3 * min(tokens * vocab * 4, loss_chunk_bytes())


def memory_plan(config: dict, *, stage: str, batch_size: int, max_length: int, dtype: str = "fp32",
                gradient_checkpointing: bool = False, lora_r: int = 16, lora_dropout: float = 0.05,
                precompute_ref: bool = True,
                attn_implementation: Optional[str] = None, gpu_memory: Optional[int] = None,
                max_gpus: int = 4096, lora_targets=None, check_lora_rank: bool = False) -> dict:
    """Estimated bytes per method (weights, gradients, optimizer, activations, logits, total), and for
    `gpu_memory` the number of GPUs each needs under FSDP (None when even `max_gpus` do not fit).
    With `check_lora_rank` (a LoRA/QLoRA stage) a rank larger than an adapted layer is a ConfigError."""
    counts = parameter_counts(config, lora_r, lora_targets)
    problem = rank_problem(lora_r, counts["shapes"]) if check_lora_rank else None
    if problem:
        raise ConfigError(problem)
    p, lin, a = counts["total"], counts["layer_linear"], counts["adapter"]
    w = 2 if dtype == "bf16" else 4
    tokens = batch_size * max_length * (2 if stage == "dpo" else 1)

    def activations(a_bytes: int, adapters: bool) -> int:
        act = activation_bytes(config, tokens, a_bytes=a_bytes, gradient_checkpointing=gradient_checkpointing,
                               eager_attention=attn_implementation == "eager", max_length=max_length)
        # LoRA's dropout keeps its output (and a mask) for every adapted module's input
        if adapters and lora_dropout > 0:
            kept = tokens * counts["adapter_inputs"] * (a_bytes + 1)
            act += kept // _dims(config)[3] if gradient_checkpointing else kept  # recomputed: one layer's
        return act

    a_bytes = 4 if dtype == "fp32" else 2
    acts = {"full": activations(a_bytes, False), "lora": activations(a_bytes, True),
            "qlora": activations(2, True)}  # QLoRA computes in bf16 whatever --dtype says
    logits = logits_bytes(config, tokens)
    ref = p * w if stage == "dpo" and not precompute_ref else 0
    states = {
        "full": {"weights": p * w + ref, "gradients": p * w, "optimizer": 2 * p * w},
        "lora": {"weights": p * (4 if dtype == "fp32" else 2) + 4 * a, "gradients": 4 * a, "optimizer": 8 * a},
        "qlora": {"weights": int(NF4_BYTES * lin) + 2 * (p - lin) + 4 * a, "gradients": 4 * a, "optimizer": 8 * a},
    }
    plan = {"parameters": p, "adapter_parameters": a, "tokens_per_micro_batch": tokens, "methods": {}}
    for method, parts in states.items():
        sharded = sum(parts.values())
        entry = {**parts, "activations": acts[method], "logits": logits,
                 "total": sharded + acts[method] + logits}
        if gpu_memory:
            entry["gpus"] = gpus_needed(sharded, acts[method] + logits, gpu_memory, max_gpus)
        plan["methods"][method] = entry
    if gpu_memory:
        plan["gpu_memory"] = gpu_memory
    return plan


def usable(gpu_memory: int) -> float:
    return 0.9 * gpu_memory - GIB


def gpus_needed(sharded: int, per_process: int, gpu_memory: int, max_gpus: int = 4096) -> Optional[int]:
    """The fewest FSDP processes (one GPU each) for which sharded / N + per_process fits one GPU."""
    room = usable(gpu_memory) - per_process
    if room <= 0:
        return None
    n = max(1, -(-sharded // int(room)))
    return n if n <= max_gpus else None


def format_plan(plan: dict) -> str:
    """The plan as a table (GB = 1e9 bytes)."""
    def gb(x):
        return f"{x / 1e9:.2f}"

    rows = [f"{plan['parameters']:,} parameters ({plan['adapter_parameters']:,} in LoRA adapters); "
            f"{plan['tokens_per_micro_batch']:,} tokens per micro-batch and process",
            "", "| method | weights | gradients | optimizer | activations | logits | total GB |"
            + (" GPUs (FSDP) |" if "gpu_memory" in plan else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if "gpu_memory" in plan else "")]
    for method, e in plan["methods"].items():
        cells = [method, *(gb(e[k]) for k in ("weights", "gradients", "optimizer", "activations", "logits", "total"))]
        if "gpu_memory" in plan:
            cells.append(str(e["gpus"]) if e["gpus"] else "does not fit")
        rows.append("| " + " | ".join(cells) + " |")
    if "gpu_memory" in plan:
        rows += ["", f"per GPU of {plan['gpu_memory'] / 1e9:.1f} GB: usable {usable(plan['gpu_memory']) / 1e9:.1f} GB "
                     "(0.9 x memory - 1 GiB)"]
    return "\n".join(rows)


def stage_memory_plan(cfg, stage: str, config: dict, gpu_memory: Optional[int] = None) -> dict:
    """memory_plan for a training stage's config (TrainConfig and its sft/dpo/pretrain subclasses)."""
    return memory_plan(config, stage=stage, batch_size=cfg.batch_size, max_length=cfg.max_length,
                       dtype=cfg.dtype, gradient_checkpointing=cfg.gradient_checkpointing, lora_r=cfg.lora_r,
                       lora_dropout=cfg.lora_dropout, precompute_ref=getattr(cfg, "precompute_ref", True),
                       attn_implementation=cfg.attn_implementation, gpu_memory=gpu_memory,
                       lora_targets=cfg.lora_targets, check_lora_rank=lora_enabled(cfg))
