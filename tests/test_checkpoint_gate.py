"""The one checkpoint gate (issue 13): symlinks, the Hugging Face cache layout, pickles, corrupt headers and
non-finite values, for every command that opens a checkpoint (upscale, merge, merge-adapter, inspect,
verify, eval, contamination, train through lm.check_model_path)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_upscale_errors import no_leftovers as nothing_written
from test_upscale_errors import run_err
from tiny import build_tiny_model

from upstack.checkpoint import copy_aux_files, open_adapter, open_checkpoint
from upstack.cli import main
from upstack.errors import CheckpointError
from upstack.lm import check_model_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 260


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def model(root):
    return build_tiny_model(root / "model", "llama", num_hidden_layers=2, vocab_size=VOCAB)


@pytest.fixture(scope="module")
def model2(root):
    return build_tiny_model(root / "model2", "llama", num_hidden_layers=2, vocab_size=VOCAB, seed=1)


@pytest.fixture(scope="module")
def secret(root):
    """A file outside every checkpoint folder (stands in for /etc/shadow)."""
    p = root / "secret.txt"
    p.write_text("root:$6$not-for-you\n")
    return p


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# -- case 3: symlinks that leave the folder are refused ---------------------------------------------

def test_upscale_refuses_aux_link_outside(model, secret, tmp_path, capsys):
    m = copy_of(model, tmp_path / "m")
    (m / "vocab.txt").symlink_to(secret)
    line = run_err(capsys, ["upscale", m, tmp_path / "out"], "vocab.txt", "outside")
    assert "not-for-you" not in line
    assert nothing_written(tmp_path, "out")


def test_copy_aux_files_refuses_link_outside(model, secret, tmp_path):
    m = copy_of(model, tmp_path / "m")
    (m / "tokenizer_config.json").unlink()
    (m / "tokenizer_config.json").symlink_to(secret)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        copy_aux_files(m, dst)
    assert not (dst / "tokenizer_config.json").exists()


def test_links_inside_the_folder_are_followed(model, tmp_path, capsys):
    m = copy_of(model, tmp_path / "m")
    (m / "real").mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (m / name).rename(m / "real" / name)
        (m / name).symlink_to(Path("real") / name)
    assert main(["upscale", str(m), str(tmp_path / "out"), "-q"]) == 0
    out = tmp_path / "out"
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert main(["verify", str(m)]) == 0


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_weights_or_config_linked_to_another_folder(model, model2, tmp_path, capsys, name):
    m = copy_of(model, tmp_path / "m")
    (m / name).unlink()
    (m / name).symlink_to(model2 / name)
    run_err(capsys, ["upscale", m, tmp_path / "out"], name, "outside")
    assert nothing_written(tmp_path, "out")
    run_err(capsys, ["inspect", m], name, "outside")
    assert main(["verify", str(m)]) == 2
    out = capsys.readouterr().out
    assert "FAILED" in out and name in out
    run_err(capsys, ["merge", m, model2, "--method", "linear", "--out", tmp_path / "merged"], name, "outside")
    with pytest.raises(CheckpointError, match="outside"):
        check_model_path(str(m))


def test_index_and_shards_linked_outside(model, secret, tmp_path, capsys):
    m = build_tiny_model(tmp_path / "sharded", "llama", num_hidden_layers=2, vocab_size=VOCAB,
                         max_shard_size="100KB", tokenizer=False)
    shard = sorted(m.glob("model-*.safetensors"))[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shard.rename(elsewhere / shard.name)
    shard.symlink_to(elsewhere / shard.name)
    run_err(capsys, ["upscale", m, tmp_path / "out"], shard.name, "outside")
    # a linked sub-folder is no way around it either
    shard.unlink()
    (m / "sub").symlink_to(elsewhere, target_is_directory=True)
    idx = m / "model.safetensors.index.json"
    index = json.loads(idx.read_text())
    index["weight_map"] = {k: (f"sub/{v}" if v == shard.name else v) for k, v in index["weight_map"].items()}
    idx.write_text(json.dumps(index))
    run_err(capsys, ["upscale", m, tmp_path / "out"], shard.name, "outside")


def test_adapter_files_linked_outside(model, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                             peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    open_adapter(adapter)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        a = copy_of(adapter, tmp_path / f"a-{name}")
        (a / name).rename(elsewhere / name)
        (a / name).symlink_to(elsewhere / name)
        with pytest.raises(CheckpointError, match=f"{name}.*outside"):
            open_adapter(a)
        shutil.move(str(elsewhere / name), str(tmp_path / f"moved-{name}"))


# -- case 4: the Hugging Face cache layout is the one accepted exception ----------------------------

def hf_cache(src: Path, cache: Path, repo: str, rev: str = "0f3c5d1e2a") -> Path:
    """`src` laid out as the Hub cache keeps it: real files in models--org--name/blobs/<sha256>, relative
    links to them in models--org--name/snapshots/<rev>/ (sub-folders too), refs/main naming the revision."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    blobs, snap = repo_dir / "blobs", repo_dir / "snapshots" / rev
    blobs.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = f.relative_to(src)
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / sha)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(rel.parts) + 1), "blobs", sha))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(rev)
    return snap


@pytest.fixture(scope="module")
def cached(root, model, model2):
    cache = root / "hub"
    sharded = build_tiny_model(root / "sharded-src", "llama", num_hidden_layers=2, vocab_size=VOCAB,
                               max_shard_size="100KB")
    return {"a": hf_cache(model, cache, "org/tiny"), "b": hf_cache(model2, cache, "org/tiny2"),
            "sharded": hf_cache(sharded, cache, "org/tiny-sharded"), "cache": cache}


@pytest.mark.parametrize("which", ["a", "sharded"])
def test_hf_cache_layout_passes_every_command(cached, which, tmp_path, capsys):
    snap = cached[which]
    assert (snap / "config.json").is_symlink() and os.readlink(snap / "config.json").startswith("../../blobs/")
    check_model_path(str(snap))
    assert main(["inspect", str(snap), "--json"]) == 0
    assert main(["verify", str(snap)]) == 0, capsys.readouterr().out
    assert main(["upscale", str(snap), str(tmp_path / "up"), "-q"]) == 0
    assert (tmp_path / "up" / "tokenizer.json").is_file() and not (tmp_path / "up" / "tokenizer.json").is_symlink()
    assert main(["merge", str(snap), str(cached["b"]), "--method", "linear", "--out", str(tmp_path / "mg"), "-q"]) == 0
    assert main(["verify", str(tmp_path / "mg")]) == 0


def test_hf_cache_hub_id_offline(cached, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cached["cache"]))
    check_model_path("org/tiny")


def test_hf_cache_links_elsewhere_refused(cached, tmp_path, capsys):
    cache = tmp_path / "hub"
    shutil.copytree(cached["cache"], cache, symlinks=True)
    snap = cache / "models--org--tiny" / "snapshots" / "0f3c5d1e2a"
    other = cache / "models--org--tiny2" / "snapshots" / "0f3c5d1e2a"
    target = os.readlink(other / "model.safetensors")  # ../../blobs/<sha> of the other repository
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(Path("../../../models--org--tiny2/snapshots/0f3c5d1e2a") / target)
    run_err(capsys, ["upscale", snap, tmp_path / "out"], "model.safetensors", "outside")
    (snap / "model.safetensors").unlink()  # another snapshot of the same repository is not its blobs/
    rev2 = snap.parent / "1111111111"
    rev2.mkdir()
    shutil.copyfile(cached["a"] / "model.safetensors", rev2 / "model.safetensors")
    (snap / "model.safetensors").symlink_to("../1111111111/model.safetensors")
    run_err(capsys, ["upscale", snap, tmp_path / "out"], "model.safetensors", "outside")
    # a folder that only looks like a snapshot (no models--* repository) gets no exception
    fake = tmp_path / "x" / "snapshots" / "r"
    fake.mkdir(parents=True)
    shutil.copytree(cached["a"], fake, dirs_exist_ok=True, symlinks=False)
    (tmp_path / "x" / "blobs").mkdir()
    (fake / "model.safetensors").rename(tmp_path / "x" / "blobs" / "w")
    (fake / "model.safetensors").symlink_to("../../blobs/w")
    with pytest.raises(CheckpointError, match="outside"):
        open_checkpoint(fake)


# -- case 5: eval, contamination and train make the same checks --------------------------------------

@pytest.fixture(scope="module")
def bad_models(root, model):
    """name -> (folder, what the one error line must say)."""
    out = {}
    trav = copy_of(model, root / "bad-traversal")
    other = root / "other"
    other.mkdir()
    shutil.move(str(trav / "model.safetensors"), str(other / "model.safetensors"))
    names = list(load_file(other / "model.safetensors"))
    (trav / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "../../other/model.safetensors" for n in names}}))
    out["traversal"] = (trav, "inside the checkpoint folder")
    pk = copy_of(model, root / "bad-pickle")
    (pk / "model.safetensors").unlink()
    torch.save(load_file(model / "model.safetensors"), pk / "pytorch_model.bin")
    out["pickle"] = (pk, "--allow-pickle")
    cor = copy_of(model, root / "bad-header")
    data = bytearray((cor / "model.safetensors").read_bytes())
    data[10:14] = b"\xff\xfe\x00{"
    (cor / "model.safetensors").write_bytes(bytes(data))
    out["header"] = (cor, "model.safetensors")
    return out


@pytest.fixture(scope="module")
def text_file(root):
    p = root / "text.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.\nQuestion: what is 12 plus 30? Answer: 42.\n")
    return p


@pytest.mark.parametrize("kind", ["traversal", "pickle", "header"])
def test_eval_and_contamination_refuse(bad_models, model, text_file, capsys, kind):
    folder, needle = bad_models[kind]
    upscale_line = run_err(capsys, ["upscale", folder, folder.parent / "never"], needle)
    line = run_err(capsys, ["eval", folder, "--perplexity", text_file, "--device", "cpu"], needle)
    if kind == "pickle":  # the same message as upscale's
        assert upscale_line.split("weights are pickled")[1] == line.split("weights are pickled")[1]
    run_err(capsys, ["eval", model, "--preference", text_file, "--preference-reference", folder], needle)
    run_err(capsys, ["contamination", folder, "--method", "min-k", "--benchmark", text_file], needle)
    run_err(capsys, ["contamination", model, "--reference", folder, "--benchmark", text_file], needle)
    with pytest.raises(CheckpointError, match="cannot load model"):
        check_model_path(str(folder))


@pytest.mark.parametrize("kind", ["traversal", "pickle", "header"])
def test_train_refuses(bad_models, tmp_path, capsys, kind):
    folder, needle = bad_models[kind]
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    run_err(capsys, ["sft", folder, "--data", data, "--out", tmp_path / "out", "--max-steps", "1"], needle)
    assert nothing_written(tmp_path, "out")


def test_allow_pickle_for_eval_and_contamination(bad_models, text_file, tmp_path, capsys):
    folder, _ = bad_models["pickle"]
    out = tmp_path / "ppl.json"
    assert main(["eval", str(folder), "--perplexity", str(text_file), "--device", "cpu", "--allow-pickle",
                 "--output", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["perplexity"][str(text_file)]["tokens"] > 0
    out = tmp_path / "mk.json"
    assert main(["contamination", str(folder), "--method", "min-k", "--benchmark", str(text_file),
                 "--num-examples", "2", "--device", "cpu", "--allow-pickle", "--output", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["benchmarks"]


def test_eval_model_args_cannot_bypass_the_gate(model, bad_models, text_file, capsys):
    folder, _ = bad_models["traversal"]
    run_err(capsys, ["eval", model, "--tasks", "arc_challenge_local", "--task-file",
                       f"arc_challenge_local={text_file}", "--model-args", f"pretrained={folder}"], "pretrained")
    run_err(capsys, ["eval", model, "--tasks", "arc_challenge_local", "--task-file",
                       f"arc_challenge_local={text_file}", "--model-args", "trust_remote_code=true"],
              "trust_remote_code")


def test_eval_prints_no_git_complaint(model, shared_data, tmp_path, monkeypatch, capfd):
    """lm-eval asks git for a commit hash; outside a repository git says `fatal: not a git repository`."""
    work = tmp_path / "not-a-repo"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    arc = shared_data / "arc_challenge" / "ARC-Challenge-Dev.jsonl"
    rc = main(["eval", str(model), "--tasks", "arc_challenge_local", "--task-file", f"arc_challenge_local={arc}",
               "--num-fewshot", "0", "--limit", "1", "--device", "cpu"])
    err = capfd.readouterr().err
    assert rc == 0, err
    assert "fatal:" not in err


# -- non-finite values ---------------------------------------------------------------------------------

def with_nan(src: Path, dst: Path, name: str = "model.layers.0.mlp.up_proj.weight", value=float("nan")) -> Path:
    copy_of(src, dst)
    w = load_file(dst / "model.safetensors")
    w[name] = w[name].clone()
    w[name].view(-1)[7] = value
    save_file(w, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_merge_refuses_nonfinite_unless_allowed(model, model2, tmp_path, capsys):
    bad = with_nan(model, tmp_path / "nan")
    line = run_err(capsys, ["merge", bad, model2, "--method", "linear", "--out", tmp_path / "out"],
                     "model.layers.0.mlp.up_proj.weight", "--allow-nonfinite")
    assert "non-finite" in line
    assert nothing_written(tmp_path, "out")
    assert main(["merge", str(bad), str(model2), "--method", "linear", "--out", str(tmp_path / "out"),
                 "--allow-nonfinite", "-q"]) == 0
    assert torch.isnan(load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]).any()


def test_merge_refuses_overflow_to_inf_in_the_output_dtype(model, model2, tmp_path, capsys):
    big = with_nan(model, tmp_path / "big", value=1e38)
    run_err(capsys, ["merge", big, model2, "--method", "linear", "--dtype", "float16", "--out", tmp_path / "out"],
              "model.layers.0.mlp.up_proj.weight", "non-finite")


def test_merge_adapter_refuses_nonfinite(model, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                             peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    w = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in w if "layers.1" in k and "lora_B" in k)
    w[key].view(-1)[0] = float("inf")
    save_file(w, adapter / "adapter_model.safetensors")
    run_err(capsys, ["merge-adapter", model, adapter, tmp_path / "out"], "model.layers.1.self_attn.q_proj.weight",
              "non-finite", "--allow-nonfinite")
    assert nothing_written(tmp_path, "out")
    assert main(["merge-adapter", str(model), str(adapter), str(tmp_path / "out"), "--allow-nonfinite", "-q"]) == 0


def test_upscale_warns_for_nonfinite_tensors_it_casts(model, tmp_path, caplog):
    bad = with_nan(model, tmp_path / "nan")
    assert main(["upscale", str(bad), str(tmp_path / "out"), "--dtype", "float16", "-q"]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "non-finite" in r.getMessage()]
    # the 2-layer source is stacked (m = 0): source layer 0 becomes output layers 0 and 2
    assert [w.split()[1] for w in warned] == ["model.layers.0.mlp.up_proj.weight",
                                              "model.layers.2.mlp.up_proj.weight"], warned


def test_verify_reports_nonfinite_tensors(model, tmp_path, capsys, monkeypatch):
    from upstack.checkpoint import verify as V

    assert main(["verify", str(model)]) == 0
    assert "finite" in capsys.readouterr().out
    bad = with_nan(model, tmp_path / "nan")
    w = load_file(bad / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"].clone()
    w["model.norm.weight"][:3] = float("-inf")
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(V, "SCAN_CHUNK_BYTES", 4096)  # many chunks per tensor: the scan is bounded
    assert main(["verify", str(bad), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    problem = next(p for p in report["problems"] if "non-finite" in p)
    assert "2 tensor(s)" in problem and "model.layers.0.mlp.up_proj.weight (1)" in problem
    assert "model.norm.weight (3)" in problem
