"""upstack merge-adapter: a PEFT adapter merged into its base equals PEFT's merge_and_unload; bad pairs refused."""

import json

import pytest
from tiny import build_tiny_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cli(*args) -> int:
    from upstack.cli import main

    return main([str(a) for a in args])


def _adapter(base_dir, out_dir, *, seed=0, **lora_kw):
    """Train-free random adapter: LoRA matrices initialised non-zero, so the merge changes every target."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora_kw}
    pm = get_peft_model(model, LoraConfig(**kw))
    with torch.no_grad():  # modules saved whole must differ from the base too
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.25)
    pm.save_pretrained(out_dir)
    return out_dir


def _peft_merged(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().state_dict()


def _ours(out_dir):
    from safetensors.torch import load_file

    got = {}
    for f in sorted(out_dir.glob("*.safetensors")):
        got.update(load_file(f))
    return got


@pytest.mark.parametrize("model_type,dtype,tied,variant", [
    ("llama", "float32", False, {}),
    ("mistral", "bfloat16", False, {}),
    ("qwen2", "float32", False, {"use_rslora": True}),
    ("llama", "float32", True, {}),
    ("llama", "bfloat16", False, {"use_dora": True}),
    ("mistral", "float32", False, {"modules_to_save": ["lm_head"], "rank_pattern": {"q_proj": 2},
                                   "alpha_pattern": {"v_proj": 3}}),
])
def test_equals_peft_merge_and_unload(tmp_path, model_type, dtype, tied, variant):
    base = build_tiny_model(tmp_path / "base", model_type, dtype=dtype, tie_word_embeddings=tied,
                            num_hidden_layers=2)
    adapter = _adapter(base, tmp_path / "adapter", **variant)
    out = tmp_path / "merged"
    assert cli("merge-adapter", base, adapter, out, "--quiet") == 0
    want = _peft_merged(base, adapter)
    got, before = _ours(out), _ours(base)
    assert set(got) == set(before) and set(got) <= set(want) and len(got) >= len(want) - 1  # a tied head once
    for name, t in got.items():
        w = want[name]
        assert t.dtype == w.dtype == getattr(torch, dtype), name
        # Both compute W + s B A in fp32 and round once to the base dtype: equal up to one rounding step.
        # PEFT adds the delta after casting it to bf16 (two roundings), so bf16 may differ by a rounding step.
        if dtype == "float32":
            assert torch.allclose(t, w, rtol=1e-6, atol=1e-7), name
        else:
            assert torch.allclose(t.float(), w.float(), rtol=2 ** -7, atol=1e-4), name
    # What the merge changed, tensor by tensor against the base: every linear module of both layers (and
    # the modules saved whole); every other tensor is the base's, bit for bit.
    changed = {name for name, t in got.items() if not torch.equal(t, before[name])}
    linear = {f"model.layers.{i}.{m}.weight" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")}
    assert changed == linear | {f"{m}.weight" for m in variant.get("modules_to_save", [])}
    meta = json.loads((out / "upstack.json").read_text())["merge_adapter"]
    assert meta["r"] == 4 and meta["modules"] == 14
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    # The output is a plain HF folder: it loads and runs.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)(torch.tensor([[1, 5, 9]]))


def test_untouched_tensors_are_byte_copies_and_dtype_override(tmp_path):
    from safetensors import safe_open

    base = build_tiny_model(tmp_path / "base", "llama", num_hidden_layers=2)
    adapter = _adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    assert cli("merge-adapter", base, adapter, tmp_path / "m", "-q") == 0
    with safe_open(base / "model.safetensors", "pt") as a, safe_open(tmp_path / "m" / "model.safetensors", "pt") as b:
        for name in a.keys():
            same = torch.equal(a.get_tensor(name), b.get_tensor(name))
            assert same == ("q_proj" not in name), name
    assert cli("merge-adapter", base, adapter, tmp_path / "h", "-q", "--dtype", "bfloat16") == 0
    assert all(t.dtype == torch.bfloat16 for t in _ours(tmp_path / "h").values())


def test_adapter_of_another_base_is_refused_and_nothing_is_written(tmp_path, capsys):
    base = build_tiny_model(tmp_path / "base", "llama", num_hidden_layers=2)
    wider = build_tiny_model(tmp_path / "wider", "llama", num_hidden_layers=2, hidden_size=96)
    adapter = _adapter(wider, tmp_path / "adapter")
    out = tmp_path / "out"
    assert cli("merge-adapter", base, adapter, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not fit base" in err and "another base" in err
    assert "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    deeper = build_tiny_model(tmp_path / "deeper", "llama", num_hidden_layers=3)
    assert cli("merge-adapter", base, _adapter(deeper, tmp_path / "a3"), out) == 2
    assert "no weight in" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["embed_tokens", "lm_head"])
def test_tied_pair_saved_whole(tmp_path, capsys, name):
    """A base that ties its head to its embedding: an adapter that trained the pair as one matrix (PEFT's
    ensure_weight_tying, which saves it under both names) merges into a checkpoint that stores it once and
    computes PEFT's logits; one that trained one of them apart from the other (no tied checkpoint computes
    it) is refused in one line, and nothing is written."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "base", "llama", num_hidden_layers=2, tie_word_embeddings=True)
    together = _adapter(base, tmp_path / "together", modules_to_save=[name], ensure_weight_tying=True)
    out = tmp_path / "merged"
    assert cli("merge-adapter", base, together, out, "--quiet") == 0
    assert "lm_head.weight" not in _ours(out)
    ids = torch.tensor([[1, 5, 9, 40, 41]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), together)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert (want - plain).abs().max() > 0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    apart = _adapter(base, tmp_path / "apart", modules_to_save=[name])
    assert cli("merge-adapter", base, apart, tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert "ties its output head to its embedding model.embed_tokens.weight" in err
    assert not (tmp_path / "o").exists()


def test_bad_adapter_folders(tmp_path, capsys):
    base = build_tiny_model(tmp_path / "base", "llama", num_hidden_layers=2)
    (tmp_path / "empty").mkdir()
    assert cli("merge-adapter", base, tmp_path / "empty", tmp_path / "o") == 2
    assert "not a PEFT adapter folder" in capsys.readouterr().err
    adapter = _adapter(base, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    assert cli("merge-adapter", base, adapter, tmp_path / "o") == 2
    assert "only LORA" in capsys.readouterr().err
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    assert cli("merge-adapter", base, adapter, tmp_path / "o") == 2
    assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dry_run_writes_nothing(tmp_path, capsys):
    base = build_tiny_model(tmp_path / "base", "llama", num_hidden_layers=2)
    adapter = _adapter(base, tmp_path / "adapter")
    assert cli("merge-adapter", base, adapter, tmp_path / "o", "--dry-run", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["modules"] == 14 and report["dry_run"] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype,variant", [("bfloat16", {}), ("float32", {"use_dora": True})])
def test_many_chunks_and_blocks_give_the_one_chunk_result(tmp_path, monkeypatch, dtype, variant):
    """The merge computes each tensor in output chunks of whole rows and, inside a chunk, in blocks of rows,
    into buffers shared by all tensors of the merge. With chunks and blocks of a few rows (many per tensor,
    ragged last ones, buffers rotating across tensors of different shapes) the output equals a merge done
    in one piece per tensor: bit for bit in bf16 here; in fp32 within the last bit (a 1-row block multiplies
    through another kernel than a many-row one)."""
    import upstack.checkpoint.adapter as A

    base = build_tiny_model(tmp_path / "base", "llama", dtype=dtype, num_hidden_layers=2)
    adapter = _adapter(base, tmp_path / "adapter", **variant)
    reads = []
    real_load = A.load_tensor

    def counting(ref, rows=None, into=None):
        reads.append(rows)
        return real_load(ref, rows, into)

    monkeypatch.setattr(A, "load_tensor", counting)
    assert cli("merge-adapter", base, adapter, tmp_path / "whole", "-q") == 0
    whole_reads, reads[:] = sum(r is not None for r in reads), []
    monkeypatch.setattr(A, "CHUNK_BYTES", 7 * 64 * (2 if dtype == "bfloat16" else 4))  # ~7 rows of 64 columns
    monkeypatch.setattr(A, "BLOCK_ELEMS", 3 * 64)                                       # ~3 rows a block
    assert cli("merge-adapter", base, adapter, tmp_path / "pieces", "-q") == 0
    assert sum(r is not None for r in reads) > 5 * whole_reads                         # many chunks per tensor
    whole, pieces = _ours(tmp_path / "whole"), _ours(tmp_path / "pieces")
    assert set(whole) == set(pieces)
    for name, t in whole.items():
        if dtype == "bfloat16":
            assert torch.equal(t, pieces[name]), name
        else:
            assert torch.allclose(t, pieces[name], rtol=1e-6, atol=1e-7), name
