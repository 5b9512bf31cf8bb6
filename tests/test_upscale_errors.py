"""Bad input for upscale/inspect/verify: one-line error, exit 2, no output (or temp folder) left behind."""

import errno
import json
import os

import pytest
import torch
from tiny import build_tiny_model

from upstack.checkpoint import writer as checkpoint
from upstack.cli import main


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "src", "llama", num_hidden_layers=4)


@pytest.fixture
def sharded(tmp_path):
    return build_tiny_model(tmp_path / "sharded", "llama", num_hidden_layers=4, max_shard_size="100KB")


def run_err(capsys, args, *needles):
    """Run the CLI on `args` (paths welcome); assert exactly one `error:` line holding every needle, exit 2."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def no_leftovers(parent, name="out"):
    return not any(p.name == name or p.name.startswith(f".{name}.tmp") for p in parent.iterdir())


def test_missing_folder(tmp_path, capsys):
    run_err(capsys, ["upscale", str(tmp_path / "nope"), str(tmp_path / "out")], "no such folder")
    assert no_leftovers(tmp_path)


def test_no_weights(tmp_path, capsys, src):
    d = tmp_path / "cfgonly"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    run_err(capsys, ["upscale", str(d), str(tmp_path / "out")], "no weights")
    assert no_leftovers(tmp_path)


def test_truncated_shard(tmp_path, capsys, sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    run_err(capsys, ["upscale", str(sharded), str(tmp_path / "out")], shard.name, "truncated")
    assert no_leftovers(tmp_path)


def test_corrupt_header(tmp_path, capsys, sharded):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[10:14] = b"\xff\xfe\x00{"
    shard.write_bytes(bytes(data))
    run_err(capsys, ["upscale", str(sharded), str(tmp_path / "out")], shard.name)


@pytest.mark.parametrize("bad", ["../evil.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_path_outside_folder(tmp_path, capsys, sharded, bad):
    idx = sharded / "model.safetensors.index.json"
    index = json.loads(idx.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = bad
    idx.write_text(json.dumps(index))
    run_err(capsys, ["upscale", str(sharded), str(tmp_path / "out")], "inside the checkpoint folder")
    assert no_leftovers(tmp_path)


def test_index_names_missing_file(tmp_path, capsys, sharded):
    idx = sharded / "model.safetensors.index.json"
    index = json.loads(idx.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "model-00042-of-00042.safetensors"
    idx.write_text(json.dumps(index))
    run_err(capsys, ["upscale", str(sharded), str(tmp_path / "out")], "model-00042-of-00042.safetensors", "missing")


def test_tensor_missing_from_index(tmp_path, capsys, sharded):
    idx = sharded / "model.safetensors.index.json"
    index = json.loads(idx.read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    idx.write_text(json.dumps(index))
    run_err(capsys, ["upscale", str(sharded), str(tmp_path / "out")], "model.layers.2.mlp.up_proj.weight")


def test_shapes_disagree_with_config(tmp_path, capsys, src):
    cfg = json.loads((src / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg["num_hidden_layers"] = 6
    (bad / "config.json").write_text(json.dumps(cfg))
    run_err(capsys, ["upscale", str(bad), str(tmp_path / "out")], "layer 4")
    cfg["num_hidden_layers"] = 4
    cfg["hidden_size"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["verify", str(bad)]) == 2
    assert "shape" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["--m", "-1"], "out of range"),
    (["--m", "4"], "out of range"),
    (["--layers", "0-3,2-4"], "out of range"),
    (["--layers", "3-1"], "backwards"),
    (["--layers", "a-b"], "cannot read"),
    (["--method", "interleave"], "--every"),
    (["--shard-size", "5XB"], "shard-size"),
    (["--dtype", "float13"], "unknown dtype"),
])
def test_bad_options(tmp_path, capsys, src, args, needle):
    run_err(capsys, ["upscale", str(src), str(tmp_path / "out"), *args], needle)
    assert no_leftovers(tmp_path)


def test_unknown_arch(tmp_path, capsys, src):
    bad = tmp_path / "weird"
    bad.mkdir()
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "weirdformer"
    (bad / "config.json").write_text(json.dumps(cfg))
    line = run_err(capsys, ["upscale", str(bad), str(tmp_path / "out")], "weirdformer", "llama", "mistral")
    assert "--allow-unknown-arch" in line
    assert main(["upscale", str(bad), str(tmp_path / "out"), "--allow-unknown-arch", "--m", "1"]) == 0
    assert "warning" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_out_exists(tmp_path, capsys, src):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_err(capsys, ["upscale", str(src), str(out)], "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["upscale", str(src), str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_pickle_refused_unless_allowed(tmp_path, capsys, src):
    from safetensors.torch import load_file

    pk = tmp_path / "pk"
    pk.mkdir()
    state = load_file(src / "model.safetensors")
    torch.save(state, pk / "pytorch_model.bin")
    (pk / "config.json").write_text((src / "config.json").read_text())
    run_err(capsys, ["upscale", str(pk), str(tmp_path / "out")], "pickle", "--allow-pickle")
    assert no_leftovers(tmp_path)
    assert main(["upscale", str(pk), str(tmp_path / "out"), "--allow-pickle", "--m", "1", "--quiet"]) == 0
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["model.layers.3.self_attn.q_proj.weight"], state["model.layers.1.self_attn.q_proj.weight"])


def test_ctrl_c_during_write_leaves_nothing(tmp_path, capsys, src, monkeypatch):
    calls = {"n": 0}
    real = checkpoint._copy_range

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(checkpoint, "_copy_range", interrupt)
    assert main(["upscale", str(src), str(tmp_path / "out"), "--quiet"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert no_leftovers(tmp_path)


def test_disk_full_leaves_nothing(tmp_path, capsys, src, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "_copy_range", full)
    run_err(capsys, ["upscale", str(src), str(tmp_path / "out")], "disk full")
    assert no_leftovers(tmp_path)


def test_ctrl_c_real_signal(tmp_path, src):
    """A real SIGINT to a running `upstack upscale` process: exit 130, no OUT, no temp folder."""
    import signal
    import subprocess
    import sys
    import time

    big = build_tiny_model(tmp_path / "big", "llama", num_hidden_layers=8, hidden_size=512, tokenizer=False)
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "upstack.cli", "upscale", str(big), str(tmp_path / "out"),
                             "--m", "2", "--quiet", "--dtype", "bfloat16"], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir()):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, 0), err
    if proc.returncode == 130:
        assert "interrupted" in err
        assert no_leftovers(tmp_path)
    else:  # finished before the signal landed: then the output must be complete
        assert (tmp_path / "out" / "config.json").is_file()


def test_inspect_and_verify_report(tmp_path, capsys, src):
    assert main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_hidden_layers"] == 4 and info["model_type"] == "llama"
    assert info["num_parameters"] == sum(v.numel() for v in __import__("safetensors.torch").torch.load_file(
        src / "model.safetensors").values())
    assert info["dtypes"] == {"F32": info["num_tensors"]}
    assert main(["verify", str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"]
    run_err(capsys, ["inspect", str(tmp_path / "missing")], "no such folder")


def test_m_with_layers_is_refused_and_a_shrinking_plan_is_flagged(tmp_path, capsys, src):
    run_err(capsys, ["upscale", str(src), str(tmp_path / "o"), "--m", "1", "--layers", "0-3"],
            "--m with --layers")
    assert no_leftovers(tmp_path, "o")
    assert main(["upscale", str(src), str(tmp_path / "small"), "--m", "3", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_hidden_layers"] == 2 and any("does not up-scale" in n for n in report["notes"])
    assert main(["upscale", str(src), str(tmp_path / "small"), "--m", "3", "--dry-run"]) == 0
    assert "note: the output has 2 layers, not more than the source's 4" in capsys.readouterr().out


def test_config_only_dry_run_counts_the_shards_the_writer_would_write(tmp_path, capsys):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000, "dtype": "bfloat16"}))
    assert main(["upscale", str(d), str(tmp_path / "o"), "--m", "8", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_parameters"] == 10_731_524_096 and report["num_shards"] == 5  # 21.5 GB in 5 GB shards
