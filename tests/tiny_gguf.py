"""Tiny GGUF files written inside tests with the `gguf` package (GGUFWriter), from tiny random Llamas
(tests/tiny.py): the import path is tested without the SmolLM2 wheel."""

from __future__ import annotations

import json
from pathlib import Path


def _permute(w, n_head: int, n_kv: int | None):
    """llama.cpp's convert_hf_to_gguf permutation of the q/k rows (transformers undoes it on load)."""
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_from_model(model_dir: str | Path, path: str | Path, qtype: str = "Q8_0", *,
                          architecture: str = "llama", raw_types: dict[str, str] | None = None) -> Path:
    """A GGUF of the Llama checkpoint `model_dir` (with its byte-level BPE tokenizer and chat template):
    2-D weights stored as `qtype` (F32, F16, Q8_0, Q4_0, Q4_1, ...), norms as F32. `raw_types` names GGUF
    tensors to store as other types, written as zero bytes (for types the gguf package cannot quantize);
    `architecture` is written as the file's general.architecture."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, path = Path(model_dir), Path(path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny test model")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    file_types = {"F32": "ALL_F32", "F16": "MOSTLY_F16"}
    w.add_file_type(gguf.LlamaFileType[file_types.get(qtype, f"MOSTLY_{qtype}")])
    vocab = tok.get_vocab()
    tokens = [""] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    specials = set(tok.all_special_tokens)
    merges = json.loads((model_dir / "tokenizer.json").read_text())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    quant = gguf.GGMLQuantizationType[qtype]
    raw_types = raw_types or {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        gname = f"{names.get_name(base)}.{suffix}"
        a = t.numpy().astype(np.float32)
        if gname.endswith("attn_q.weight"):
            a = _permute(a, cfg.num_attention_heads, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            a = _permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        if gname in raw_types:
            rtype = gguf.GGMLQuantizationType[raw_types[gname]]
            block, size = gguf.GGML_QUANT_SIZES[rtype]
            raw = np.zeros((a.shape[0], a.shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(gname, raw, raw_dtype=rtype)
        elif a.ndim == 2 and qtype == "F16":
            w.add_tensor(gname, a.astype(np.float16))
        elif a.ndim == 2 and qtype != "F32":
            w.add_tensor(gname, gguf.quants.quantize(a, quant), raw_dtype=quant)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
