"""Depth up-scaling: layer plans, bit-exact copies, config remaps, and loadable output for every arch."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import build_tiny_model
from transformers import AutoModelForCausalLM

from upstack.arch import parse_layer_ranges
from upstack.checkpoint import verify_checkpoint
from upstack.cli import main
from upstack.upscale import make_layer_plan

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def assert_layer_mapped(src: Path, out: Path, layer_map, zero_layers=()):
    s, o = load_all(src), load_all(out)
    expected_names = set()
    for name, t in s.items():
        if ".layers." not in name:
            expected_names.add(name)
            assert torch.equal(bits(o[name]), bits(t)), name
    for j, i in enumerate(layer_map):
        prefix = f"model.layers.{i}."
        for name, t in s.items():
            if name.startswith(prefix):
                new = f"model.layers.{j}." + name[len(prefix):]
                expected_names.add(new)
                if j in zero_layers and (".o_proj." in new or ".down_proj." in new):
                    assert not o[new].any(), new
                else:
                    assert torch.equal(bits(o[new]), bits(t)), new
    assert set(o) == expected_names


def test_dus_layer_map_matches_paper():
    # SOLAR: n=32, m=8 -> [0..23] + [8..31], 48 layers; output i = i if i < 24 else i - 16.
    plan = make_layer_plan(32, "dus", m=8)
    assert len(plan.layer_map) == 48
    assert plan.layer_map == [i if i < 24 else i - (32 - 16) for i in range(48)]
    assert make_layer_plan(32, "stack").layer_map == list(range(32)) * 2
    assert parse_layer_ranges("0-23,8-31", 32) == plan.layer_map
    assert make_layer_plan(4, "interleave", every=2).layer_map == [0, 1, 1, 2, 3, 3]
    assert make_layer_plan(4, "interleave", every=2).new_layers == [2, 5]


@pytest.mark.parametrize("arch", ARCHS)
def test_dus_every_arch(tmp_path, arch):
    src = build_tiny_model(tmp_path / "src", arch, num_hidden_layers=4)
    out = tmp_path / "out"
    rc = main(["upscale", str(src), str(out), "--m", "1", "--quiet"])
    assert rc == 0
    layer_map = [0, 1, 2, 1, 2, 3]
    assert_layer_mapped(src, out, layer_map)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    if "layer_types" in cfg:
        src_types = json.loads((src / "config.json").read_text())["layer_types"]
        assert cfg["layer_types"] == [src_types[i] for i in layer_map]
    prov = json.loads((out / "upstack.json").read_text())["upscale"]
    assert prov["layer_map"] == layer_map
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / f).is_file(), f
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 5, 9, 12]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "phi3"])
def test_interleave_computes_same_function(tmp_path, arch):
    src = build_tiny_model(tmp_path / "src", arch, num_hidden_layers=4)
    out = tmp_path / "out"
    assert main(["upscale", str(src), str(out), "--method", "interleave", "--every", "2", "--quiet"]) == 0
    assert_layer_mapped(src, out, [0, 1, 1, 2, 3, 3], zero_layers={2, 5})
    ids = torch.tensor([[1, 7, 3, 99, 42, 5, 8, 2]])
    a = AutoModelForCausalLM.from_pretrained(src)
    b = AutoModelForCausalLM.from_pretrained(out)
    assert b.config.num_hidden_layers == 6
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits, b(input_ids=ids).logits
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    assert json.loads((out / "upstack.json").read_text())["upscale"]["new_layers"] == [2, 5]


def test_tied_embeddings_and_stack(tmp_path):
    src = build_tiny_model(tmp_path / "src", "qwen2", tie_word_embeddings=True, num_hidden_layers=3)
    assert "lm_head.weight" not in load_all(src)
    out = tmp_path / "out"
    assert main(["upscale", str(src), str(out), "--method", "stack", "--quiet"]) == 0
    assert_layer_mapped(src, out, [0, 1, 2, 0, 1, 2])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_explicit_layers_sharded_output_and_verify(tmp_path):
    src = build_tiny_model(tmp_path / "src", "mistral", num_hidden_layers=4, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "out"
    assert main(["upscale", str(src), str(out), "--layers", "0-2,1,3", "--shard-size", "150KB", "--quiet"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size <= 150_000 + 20_000 for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_all(out).values())
    assert_layer_mapped(src, out, [0, 1, 2, 1, 3])
    report = verify_checkpoint(out, load=True)
    assert report["ok"], report


def test_dtype_cast_and_default_keeps_bytes(tmp_path):
    src = build_tiny_model(tmp_path / "src", "llama", num_hidden_layers=2, dtype="bfloat16")
    out = tmp_path / "out"
    assert main(["upscale", str(src), str(out), "--m", "0", "--dtype", "float32", "--quiet"]) == 0
    s, o = load_all(src), load_all(out)
    for name, t in o.items():
        assert t.dtype == torch.float32
    assert torch.equal(o["model.layers.3.mlp.up_proj.weight"], s["model.layers.1.mlp.up_proj.weight"].float())
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    out2 = tmp_path / "out2"
    assert main(["upscale", str(src), str(out2), "--m", "0", "--quiet"]) == 0
    assert all(t.dtype == torch.bfloat16 for t in load_all(out2).values())


def test_dry_run_mistral_config(tmp_path, shared_data, capsys):
    cfg_dir = shared_data / "tokenizers" / "mistral-7b-v0.1-hf"
    out = tmp_path / "never"
    assert main(["upscale", str(cfg_dir), str(out), "--m", "8", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_hidden_layers"] == 48
    assert report["num_parameters"] == 10_731_524_096
    assert report["layer_map"] == list(range(24)) + list(range(8, 32))
    assert report["output_bytes"] == 10_731_524_096 * 2  # bfloat16
    assert not out.exists()


def test_dry_run_with_weights_prints_table(tmp_path, capsys):
    src = build_tiny_model(tmp_path / "src", "llama", num_hidden_layers=4)
    assert main(["upscale", str(src), str(tmp_path / "o"), "--m", "1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "3-5" in text and "1-3" in text and "dry run" in text
    assert not (tmp_path / "o").exists()


def test_per_layer_field_remaps(tmp_path):
    from upstack.arch import ARCHS, remap_config

    cfg = {"model_type": "qwen2", "num_hidden_layers": 8, "max_window_layers": 6, "use_sliding_window": True,
           "sliding_window": 16}
    new, _ = remap_config(cfg, ARCHS["qwen2"], make_layer_plan(8, "dus", m=2).layer_map)
    # source layers 6,7 slide; output = [0..5] + [2..7]: layers 10, 11 slide -> threshold 10
    assert new["max_window_layers"] == 10 and new["num_hidden_layers"] == 12
    bad = dict(cfg, max_window_layers=3)  # slides from 3: output [0..5]+[2..7] is F F F T T T F T T T T T
    with pytest.raises(Exception, match="cannot describe the new layer order"):
        remap_config(bad, ARCHS["qwen2"], make_layer_plan(8, "dus", m=2).layer_map)
    moe = {"model_type": "qwen2_moe", "num_hidden_layers": 4, "mlp_only_layers": [1, 3]}
    new, _ = remap_config(moe, ARCHS["qwen2_moe"], [0, 1, 2, 1, 2, 3])
    assert new["mlp_only_layers"] == [1, 3, 5]
    g3 = {"model_type": "gemma3_text", "num_hidden_layers": 4, "sliding_window_pattern": 2,
          "layer_types": ["sliding_attention", "full_attention"] * 2}
    new, notes = remap_config(g3, ARCHS["gemma3_text"], [0, 1, 2, 1, 2, 3])
    assert new["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention",
                                  "full_attention", "sliding_attention", "full_attention"]
    assert new["sliding_window_pattern"] == 2
    new, notes = remap_config(g3, ARCHS["gemma3_text"], [0, 1, 1, 2, 3])
    assert "sliding_window_pattern" not in new and any("dropped" in n for n in notes)
