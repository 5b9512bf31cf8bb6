"""Tiny random models and tokenizers built from configs inside tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

# Per-architecture overrides on top of the common tiny sizes.
ARCH_KWARGS = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {"max_window_layers": 2, "use_sliding_window": False},
    "qwen3": {"head_dim": 16, "max_window_layers": 2, "use_sliding_window": False},
    "gemma": {"head_dim": 16},
    "gemma2": {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16},
    "phi3": {"pad_token_id": 0},
}


def tiny_config(model_type: str = "llama", *, vocab_size: int = 256, num_hidden_layers: int = 4,
                hidden_size: int = 64, tie_word_embeddings: bool = False, **overrides):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1, eos_token_id=2,
    )
    kwargs.update(ARCH_KWARGS.get(model_type, {}))
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(path: str | Path, model_type: str = "llama", *, seed: int = 0, dtype: str = "float32",
                     max_shard_size: str | None = None, tokenizer: bool = True, **config_kwargs) -> Path:
    """Save a random tiny causal LM (and a tiny tokenizer) to `path`; return the path."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    tok = build_tiny_tokenizer(path, vocab_size=config_kwargs.get("vocab_size", 256)) if tokenizer else None
    if tok is not None:  # the byte-level BPE has at least 256 bytes + 4 specials: the model must cover them
        config_kwargs["vocab_size"] = max(config_kwargs.get("vocab_size", 256), len(tok))
    cfg = tiny_config(model_type, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    # Make every tensor non-trivial (norm weights start at 1 or 0), so copies are checkable bit for bit.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Depth up-scaling stacks two copies of a model and drops the seam layers.",
    "Question: what is 12 plus 30? Answer: 42.",
    "Instruction tuning teaches a model to follow requests.",
] * 20


def build_tiny_tokenizer(path: str | Path, vocab_size: int = 256, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with <unk>=0, <s>=1, </s>=2, <pad>=3 and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)
    return fast
