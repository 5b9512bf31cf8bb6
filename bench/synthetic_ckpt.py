"""Build synthetic checkpoints with Mistral-7B's tensor shapes (random bf16), tensor by tensor.

Used by bench/upscale.py and bench/merge.py. Streams through upstack's own writer, so building a
4 GB checkpoint needs about 64 MB of memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from upstack.checkpoint import TensorPlan, write_checkpoint

MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 32000, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "hidden_act": "silu", "dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}


def mistral_shapes(num_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    h, i, kv, v = 4096, 14336, 1024, 32000
    shapes = [("model.embed_tokens.weight", (v, h))]
    for n in range(num_layers):
        p = f"model.layers.{n}."
        shapes += [
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def _random_bf16(nbytes: int, rng: np.random.Generator, chunk: int = 32 << 20):
    """Random bf16 values of magnitude ~0.02 (normal fp32 truncated to its top 16 bits), in chunks."""
    for start in range(0, nbytes, chunk):
        n = min(chunk, nbytes - start) // 2
        x = (rng.standard_normal(n, dtype=np.float32) * 0.02).view(np.uint32) >> 16
        yield x.astype(np.uint16).tobytes()


def build_mistral_like(out: str | Path, num_layers: int, seed: int = 0, shard_size: int = 5 * 10**9) -> Path:
    rng = np.random.default_rng(seed)
    plans = []
    for name, shape in mistral_shapes(num_layers):
        nbytes = int(np.prod(shape)) * 2
        plans.append(TensorPlan(name, "BF16", shape, compute=lambda nb=nbytes: _random_bf16(nb, rng)))
    config = dict(MISTRAL_7B, num_hidden_layers=num_layers)
    write_checkpoint(plans, out, config=config, shard_size=shard_size, overwrite=True, progress=False)
    (Path(out) / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return Path(out)
