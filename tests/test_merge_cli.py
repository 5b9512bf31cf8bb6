"""`upstack merge` end to end on tiny checkpoints: formulas per method, tied heads, configs, bad input."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny import build_tiny_model

from upstack import merge as M
from upstack.checkpoint import verify_checkpoint
from upstack.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-models")
    kw = dict(num_hidden_layers=2, vocab_size=256, tie_word_embeddings=False)
    paths = {
        "a": build_tiny_model(root / "a", seed=1, **kw),
        "b": build_tiny_model(root / "b", seed=2, **kw),
        "base": build_tiny_model(root / "base", seed=3, **kw),
        "a16": build_tiny_model(root / "a16", seed=1, dtype="bfloat16", **kw),
        "b16": build_tiny_model(root / "b16", seed=2, dtype="bfloat16", **kw),
        "tied": build_tiny_model(root / "tied", seed=4, num_hidden_layers=2, vocab_size=256, tie_word_embeddings=True),
        "tied2": build_tiny_model(root / "tied2", seed=5, num_hidden_layers=2, vocab_size=256,
                                  tie_word_embeddings=True),
        "vocab": build_tiny_model(root / "vocab", seed=6, num_hidden_layers=2, vocab_size=320,
                                  tie_word_embeddings=False),
        "layers": build_tiny_model(root / "layers", seed=7, num_hidden_layers=3, vocab_size=256,
                                   tie_word_embeddings=False),
        "wide": build_tiny_model(root / "wide", seed=8, num_hidden_layers=2, vocab_size=256, intermediate_size=96,
                                 tie_word_embeddings=False),
        "qwen": build_tiny_model(root / "qwen", "qwen2", seed=9, num_hidden_layers=2, vocab_size=256,
                                 tie_word_embeddings=False),
    }
    # same vocab size, different tokens: ids of two tokens swapped
    paths["tokens"] = build_tiny_model(root / "tokens", seed=2, **kw)
    tok_file = paths["tokens"] / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    vocab = tok["model"]["vocab"]
    x, y = sorted(vocab, key=vocab.get)[100:102]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    tok_file.write_text(json.dumps(tok))
    return {k: str(v) for k, v in paths.items()}


def weights(folder):
    out = {}
    for f in sorted(__import__("pathlib").Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run(*argv):
    return main(["merge", *map(str, argv), "-q"])


def check_close(out, expect, atol=1e-6):
    assert set(out) == set(expect), set(out) ^ set(expect)
    for k in expect:
        assert out[k].dtype == torch.float32
        assert torch.allclose(out[k].double(), expect[k].double(), atol=atol), k


def depth(name):
    return M.tensor_depth(name, 2)


# -- each method against its formula on tiny models ---------------------------------------------------

def test_linear_weights(models, tmp_path):
    assert run(models["a"], models["b"], "--method", "linear", "--weights", "0.4,0.6", "--out", tmp_path / "m") == 0
    a, b = weights(models["a"]), weights(models["b"])
    check_close(weights(tmp_path / "m"), {k: (0.4 * a[k].double() + 0.6 * b[k].double()) for k in a})


def test_average_of_identical_bf16_models_is_byte_identical(models, tmp_path):
    assert run(models["a16"], models["a16"], "--method", "average", "--out", tmp_path / "m") == 0
    a, out = weights(models["a16"]), weights(tmp_path / "m")
    assert all(out[k].dtype == torch.bfloat16 and torch.equal(out[k], a[k]) for k in a)


def test_slerp_gradient_with_filters(models, tmp_path):
    cfg = tmp_path / "slerp.yaml"
    cfg.write_text(f"""
models:
  - model: {models['a']}
  - model: {models['b']}
merge_method: slerp
base_model: {models['a']}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - filter: mlp
      value: [1, 0.5, 0]
    - value: 0.25
dtype: float32
""")
    assert run("--config", cfg, "--out", tmp_path / "m") == 0
    a, b, out = weights(models["a"]), weights(models["b"]), weights(tmp_path / "m")
    for k in a:
        d = depth(k)
        t = d if "self_attn" in k else (1 - d) if "mlp" in k else 0.25
        a64, b64 = a[k].double().flatten(), b[k].double().flatten()
        cos = float((a64 / a64.norm()) @ (b64 / b64.norm()))
        if abs(cos) > 0.9995:
            expect = (1 - t) * a64 + t * b64
        else:
            th = math.acos(cos)
            expect = (math.sin((1 - t) * th) * a64 + math.sin(t * th) * b64) / math.sin(th)
        assert torch.allclose(out[k].double().flatten(), expect, atol=1e-6), k
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.1.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


def test_task_arithmetic(models, tmp_path):
    assert run(models["a"], models["b"], "--method", "task_arithmetic", "--base", models["base"],
               "--weights", "0.7,0.2", "--lambda", "0.9", "--out", tmp_path / "m") == 0
    a, b, base = weights(models["a"]), weights(models["b"]), weights(models["base"])
    expect = {k: base[k].double() + 0.9 * (0.7 * (a[k].double() - base[k]) + 0.2 * (b[k].double() - base[k]))
              for k in a}
    check_close(weights(tmp_path / "m"), expect)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_ties_and_dare_match_the_pure_functions(models, tmp_path, method):
    assert run(models["a"], models["b"], "--method", method, "--base", models["base"], "--weights", "1,0.5",
               "--density", "0.4", "--seed", "7", "--out", tmp_path / "m") == 0
    a, b, base = (weights(models[k]) for k in ("a", "b", "base"))
    out = weights(tmp_path / "m")
    for k in a:
        xs = [a[k], b[k]]
        if method == "ties":
            expect = M.ties(base[k], xs, [1, 0.5], 0.4)
        else:
            expect = M.dare(base[k], xs, [1, 0.5], 0.4, seed=7, name=k, ties=method == "dare_ties")
        assert torch.equal(out[k], expect), k
    # and the pure functions against the formulas written out (see test_merge.py) on one tensor
    from test_merge import dare_ref, ties_ref

    k = "model.layers.1.mlp.down_proj.weight"
    if method == "ties":
        ref = ties_ref(base[k], [a[k], b[k]], [1, 0.5], 0.4)
    else:
        ref = dare_ref(base[k], [a[k], b[k]], [1, 0.5], 0.4, 7, k, ties=method == "dare_ties")
    assert torch.allclose(out[k].double(), ref, atol=1e-6)


def test_dare_is_reproducible_and_density_one_is_its_counterpart(models, tmp_path):
    common = [models["a"], models["b"], "--base", models["base"]]
    assert run(*common, "--method", "dare_ties", "--density", "0.5", "--seed", "3", "--out", tmp_path / "1") == 0
    assert run(*common, "--method", "dare_ties", "--density", "0.5", "--seed", "3", "--out", tmp_path / "2") == 0
    assert run(*common, "--method", "dare_ties", "--density", "0.5", "--seed", "4", "--out", tmp_path / "3") == 0
    one, two = (tmp_path / "1" / "model.safetensors").read_bytes(), (tmp_path / "2" / "model.safetensors").read_bytes()
    assert one == two
    assert one != (tmp_path / "3" / "model.safetensors").read_bytes()
    assert run(*common, "--method", "dare_linear", "--density", "1", "--out", tmp_path / "dl") == 0
    assert run(*common, "--method", "task_arithmetic", "--out", tmp_path / "ta") == 0
    dl, ta = weights(tmp_path / "dl"), weights(tmp_path / "ta")
    assert all(torch.equal(dl[k], ta[k]) for k in ta)


# -- end to end ----------------------------------------------------------------------------------------

def test_merged_checkpoint_loads_runs_and_verifies(models, tmp_path):
    out = tmp_path / "m"
    assert run(models["a16"], models["b16"], "--method", "slerp", "--t", "0.5", "--shard-size", "100KB",
               "--out", out) == 0
    assert (out / "model.safetensors.index.json").is_file()
    report = verify_checkpoint(out, load=True)
    assert report["ok"], report["problems"]
    assert main(["verify", str(out), "-q"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()
    assert tok.chat_template  # from the first model
    card = (out / "README.md").read_text()
    assert "slerp" in card and models["a16"] in card and "t: 0.5" in card
    prov = json.loads((out / "upstack.json").read_text())["merge"]
    assert prov["method"] == "slerp" and prov["parameters"] == {"t": 0.5}


def test_dtype_option(models, tmp_path):
    assert run(models["a"], models["b"], "--method", "linear", "--dtype", "bfloat16", "--out", tmp_path / "m") == 0
    out = weights(tmp_path / "m")
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"


def test_untied_and_tied_models(models, tmp_path):
    assert run(models["a"], models["tied"], "--method", "linear", "--out", tmp_path / "m") == 0
    a, tied, out = weights(models["a"]), weights(models["tied"]), weights(tmp_path / "m")
    assert "lm_head.weight" not in tied
    emb = "model.embed_tokens.weight"
    assert torch.allclose(out["lm_head.weight"], (a["lm_head.weight"] + tied[emb]) / 2, atol=1e-6)
    assert torch.allclose(out[emb], (a[emb] + tied[emb]) / 2, atol=1e-6)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    assert verify_checkpoint(tmp_path / "m", load=True)["ok"]
    # the tied model first: same rule, lm_head appended
    assert run(models["tied"], models["a"], "--method", "linear", "--out", tmp_path / "m2") == 0
    out2 = weights(tmp_path / "m2")
    assert torch.allclose(out2["lm_head.weight"], out["lm_head.weight"], atol=1e-6)


def test_tied_models_stay_tied(models, tmp_path):
    assert run(models["tied"], models["tied2"], "--method", "slerp", "--t", "0.3", "--out", tmp_path / "m") == 0
    out = weights(tmp_path / "m")
    assert "lm_head.weight" not in out
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is True
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_solar_average_config_and_dry_run(models, tmp_path, capsys):
    cfg = tmp_path / "solar.yaml"
    cfg.write_text(f"""# SOLAR-10.7B-Instruct: average of two DPO models
models:
  - model: {models['a']}
    parameters:
      weight: 0.5
  - {models['b']}
parameters:
  weight: 0.5
method: average
""")
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "m"), "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert not (tmp_path / "m").exists()
    assert report["dry_run"] and report["method"] == "linear" and report["num_tensors"] == 21
    assert report["output_bytes"] == sum(v.numel() * 4 for v in weights(models["a"]).values())
    assert any(g["group"] == "model.layers.*.mlp.up_proj.weight" and g["tensors"] == 2 for g in report["groups"])
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "m"), "-q"]) == 0
    assert main(["merge", models["a"], models["b"], "--method", "linear", "--out", str(tmp_path / "f"), "-q"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'm'}", f"wrote {tmp_path / 'f'}"]  # -q: no table
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == (tmp_path / "f" / "model.safetensors").read_bytes()
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "m"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run: nothing written" in text and "model.layers.*.self_attn.q_proj.weight" in text


def test_failure_midway_leaves_nothing(models, tmp_path, monkeypatch):
    real = M.compute_chunks
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise OSError("simulated read error")
        yield from real(*args, **kwargs)

    monkeypatch.setattr(M.kernels, "compute_chunks", failing)
    with pytest.raises(OSError):
        M.merge(M.MergeConfig(models=[M.ModelEntry(models["a"]), M.ModelEntry(models["b"])], method="linear",
                              out=str(tmp_path / "m"), quiet=True))
    assert list(tmp_path.iterdir()) == []


# -- bad input: one line, exit 2, nothing written ------------------------------------------------------

@pytest.mark.parametrize("args,msg", [
    (["a", "qwen", "--method", "linear"], "different architectures"),
    (["a", "wide", "--method", "linear"], "models differ at tensor 'model.layers.0.mlp.down_proj.weight': shape"),
    (["a", "layers", "--method", "linear"], "models differ at tensor 'model.layers.2."),
    (["a", "vocab", "--method", "linear"], "vocabularies differ: a has"),
    (["a", "tokens", "--method", "linear"], "vocabularies differ: token id"),
    (["a", "b", "--method", "ties", "--density", "0.5"], "needs a base model"),
    (["a", "b", "--method", "linear", "--weights", "1,-1"], "weights sum to zero"),
    (["a", "b", "--method", "slerp", "--t", "1.5"], "t=1.5 is out of range"),
    (["a", "b", "--method", "slerp"], "needs parameter t"),
    (["a", "b", "base", "--method", "slerp", "--t", "0.5"], "exactly two models"),
    (["a", "b", "--method", "ties", "--base", "base", "--density", "0"], "density=0 is out of range"),
    (["a", "b", "--method", "dare_ties", "--base", "base", "--density", "1.5"], "density=1.5 is out of range"),
    (["a", "b", "--method", "linear", "--t", "0.5"], "parameter 't' is not used by method linear"),
    (["a", "b", "--method", "frankenmerge"], "unknown merge method 'frankenmerge'"),
    (["a", "b", "--method", "linear", "--weights", "1,2,3"], "--weights has 3 value(s) for 2 model(s)"),
])
def test_bad_input(models, tmp_path, capsys, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    for k, v in models.items():
        (tmp_path / k).symlink_to(v)
    code = main(["merge", *args, "--out", "out", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert msg in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_config_errors(models, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"models: [{models['a']}, {models['b']}]\nmethod: linear\nslices: []\ntokenizer_source: base\n")
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) slices, tokenizer_source" in err
    cfg.write_text(f"models:\n  - model: {models['a']}\n    wieght: 2\n  - model: {models['b']}\nmethod: linear\n")
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "unknown option(s) wieght" in capsys.readouterr().err
    cfg.write_text(f"models: [{models['a']}, {models['b']}]\nmethod: slerp\nparameters:\n  t: [{{fliter: mlp, value: 1}}]\n")
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "unknown key(s) fliter" in capsys.readouterr().err
    cfg.write_text("models: [a, b\n")
    assert main(["merge", "--config", str(cfg), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["merge", "--config", str(cfg), models["a"], "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "with --config" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_out_exists(models, tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(models["a"], models["b"], "--method", "linear", "--out", out) == 2
    assert "already exists (pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert run(models["a"], models["b"], "--method", "linear", "--out", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert run(models["a"], models["b"], "--method", "linear", "--out", models["a"], "--overwrite") == 2
    assert "is one of the input models" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["linear", "slerp", "ties", "dare_ties"])
def test_streaming_does_not_depend_on_workers_or_chunks(models, tmp_path, monkeypatch, method):
    # small blocks and chunks: every tensor spans many blocks, chunks and worker threads
    monkeypatch.setattr(M.blocks, "BLOCK", 1024)
    monkeypatch.setattr(M.streaming, "CHUNK_BYTES", 3 * 1024 * 4)
    params = {"slerp": {"t": 0.3}, "ties": {"density": 0.3}, "dare_ties": {"density": 0.3}}.get(method, {})
    base = None if method in ("linear", "slerp") else models["base"]
    outs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        M.merge(M.MergeConfig(models=[M.ModelEntry(models["a"], weight=None), M.ModelEntry(models["b"])],
                              method=method, base=base, parameters=params, seed=5, out=str(out),
                              workers=workers, quiet=True))
        outs.append(weights(out))
    a, b = weights(models["a"]), weights(models["b"])
    for k in a:
        assert torch.equal(outs[0][k], outs[1][k]), k
        if method == "slerp":
            expect = M.slerp(a[k], b[k], 0.3)
        elif method == "linear":
            expect = M.linear([a[k], b[k]])
        else:
            base_t = weights(models["base"])[k]
            expect = (M.ties(base_t, [a[k], b[k]], density=0.3) if method == "ties"
                      else M.dare(base_t, [a[k], b[k]], density=0.3, seed=5, name=k, ties=True))
        assert torch.equal(outs[0][k], expect), k


def test_raw_checkpoints_with_misaligned_and_integer_tensors(tmp_path):
    # A 3-byte U8 tensor first puts every later tensor at an odd offset: those are read with pread
    # instead of being memory-mapped; integer tensors are copied from the first model, not merged.
    from upstack.checkpoint import TensorPlan, tensor_to_bytes, write_checkpoint

    def build(path, seed):
        g = torch.Generator().manual_seed(seed)
        tensors = {"a.mask": torch.tensor([1, 2, seed], dtype=torch.uint8),
                   "b.w": torch.randn(300, 7, generator=g).bfloat16(), "c.v": torch.randn(11, generator=g)}
        plans = [TensorPlan(k, {torch.uint8: "U8", torch.bfloat16: "BF16", torch.float32: "F32"}[v.dtype],
                            tuple(v.shape), compute=lambda v=v: [tensor_to_bytes(v)]) for k, v in tensors.items()]
        write_checkpoint(plans, path, config={"model_type": "custom"}, progress=False)
        return tensors

    x, y = build(tmp_path / "x", 1), build(tmp_path / "y", 2)
    assert run(tmp_path / "x", tmp_path / "y", "--method", "slerp", "--t", "0.25", "--out", tmp_path / "m") == 0
    out = weights(tmp_path / "m")
    assert torch.equal(out["a.mask"], x["a.mask"])
    assert torch.equal(out["b.w"], M.slerp(x["b.w"], y["b.w"], 0.25).bfloat16())
    assert torch.equal(out["c.v"], M.slerp(x["c.v"], y["c.v"], 0.25))


def test_bf16_average_equals_the_fp32_computation(models, tmp_path):
    # the streaming merge averages two bf16 models with one fused torch.lerp in bf16; it must give the
    # fp32 result rounded once, bit for bit
    assert run(models["a16"], models["b16"], "--method", "linear", "--weights", "0.4,0.6", "--out", tmp_path / "m") == 0
    a, b, out = weights(models["a16"]), weights(models["b16"]), weights(tmp_path / "m")
    for k in a:
        assert out[k].dtype == torch.bfloat16
        assert torch.equal(out[k], M.linear([a[k], b[k]], [0.4, 0.6]).bfloat16()), k
        expect = (0.4 * a[k].double() + 0.6 * b[k].double()).bfloat16()
        assert (out[k].float() - expect.float()).abs().max() <= 2 ** -7 * expect.float().abs().max()


def test_pickled_checkpoints_need_allow_pickle(models, tmp_path, capsys):
    import shutil

    pickled = tmp_path / "pickled"
    shutil.copytree(models["b"], pickled)
    state = load_file(pickled / "model.safetensors")
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    assert run(models["a"], pickled, "--method", "linear", "--out", tmp_path / "m") == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert run(models["a"], pickled, "--method", "linear", "--allow-pickle", "--out", tmp_path / "m") == 0
    a, out = weights(models["a"]), weights(tmp_path / "m")
    check_close(out, {k: (a[k].double() + state[k].double()) / 2 for k in a})
