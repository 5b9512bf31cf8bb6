"""Reliability round 3 (issue 22): the checkpoint gate for `eval --model-args`, non-regular files (FIFOs,
devices), and hostile or wrong adapter configs for merge-adapter (patterns, alpha, r, fan_in_fan_out,
modules saved whole), with the messages of a full disk and a malicious pickle."""

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny import build_tiny_model

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file, save_file  # noqa: E402

from upstack.cli import main  # noqa: E402
from upstack.errors import CheckpointError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SRC = Path(__file__).resolve().parent.parent / "src"


def run_one_line(capsys, args, *needles) -> str:
    """Run the CLI on `args`: exit 2 and stderr exactly one line, `error: ...`, holding every needle."""
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gate3")


@pytest.fixture(scope="module")
def model(root):
    return build_tiny_model(root / "model", "llama", num_hidden_layers=2)


@pytest.fixture(scope="module")
def secret(root):
    p = root / "passwd"
    p.write_text("root:x:0:0:not-for-you:/root:/bin/bash\n")
    return p


@pytest.fixture(scope="module")
def text_file(root):
    p = root / "text.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.\nQuestion: what is 12 plus 30? Answer: 42.\n")
    return p


def make_adapter(base, out, *, seed=0, **lora_kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, **lora_kw}
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(**kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.25)
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter(root, model):
    return make_adapter(model, root / "adapter")


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def merged(folder: Path) -> dict:
    got = {}
    for f in sorted(folder.glob("*.safetensors")):
        got.update(load_file(f))
    return got


# ------------------------------------------------------------------------------------------------
# Item 3: every path-valued --model-args goes through the gate, or is refused

def eval_args(model, text_file, model_args):
    return ["eval", model, "--perplexity", text_file, "--device", "cpu", "-q", "--model-args", model_args]


def test_model_args_peft_pickled_adapter_needs_allow_pickle(model, adapter, text_file, tmp_path, capsys):
    pk = copy_of(adapter, tmp_path / "pickled")
    torch.save(load_file(pk / "adapter_model.safetensors"), pk / "adapter_model.bin")
    (pk / "adapter_model.safetensors").unlink()
    run_one_line(capsys, eval_args(model, text_file, f"peft={pk}"), "peft", "adapter_model.bin", "--allow-pickle")


def test_model_args_peft_adapter_linked_outside_is_refused(model, adapter, secret, text_file, tmp_path, capsys):
    out = copy_of(adapter, tmp_path / "linked")
    (out / "adapter_config.json").unlink()
    (out / "adapter_config.json").symlink_to(secret)
    line = run_one_line(capsys, eval_args(model, text_file, f"peft={out}"), "peft", "adapter_config.json", "outside")
    assert "not-for-you" not in line


def test_model_args_delta_checkpoint_linked_outside_is_refused(model, root, text_file, tmp_path, capsys):
    delta = copy_of(model, tmp_path / "delta")
    other = tmp_path / "other"
    other.mkdir()
    (delta / "model.safetensors").rename(other / "model.safetensors")
    (delta / "model.safetensors").symlink_to(other / "model.safetensors")
    run_one_line(capsys, eval_args(model, text_file, f"delta={delta}"), "delta", "model.safetensors", "outside")


def test_model_args_delta_pickle_is_refused(model, text_file, tmp_path, capsys):
    delta = copy_of(model, tmp_path / "delta")
    torch.save(load_file(delta / "model.safetensors"), delta / "pytorch_model.bin")
    (delta / "model.safetensors").unlink()
    run_one_line(capsys, eval_args(model, text_file, f"delta={delta}"), "delta", "--allow-pickle")


def test_model_args_tokenizer_linked_to_a_secret_is_refused(model, secret, text_file, tmp_path, capsys):
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in model.glob("tokenizer*"):
        shutil.copy(f, tok / f.name)
    (tok / "tokenizer.json").unlink()
    (tok / "tokenizer.json").symlink_to(secret)
    line = run_one_line(capsys, eval_args(model, text_file, f"tokenizer={tok}"), "tokenizer", "outside")
    assert "not-for-you" not in line
    run_one_line(capsys, eval_args(model, text_file, f"tokenizer={secret}"), "tokenizer", "not a folder")


@pytest.mark.parametrize("arg,needle", [
    ("subfolder=sub", "subfolder"),
    ("gguf_file=model.gguf", "gguf_file"),
    ("revision=v2", "revision"),
    ("variant=fp16", "variant"),
    ("use_safetensors=false", "use_safetensors"),
    ("weights_only=false", "weights_only"),
    ("autogptq=model.safetensors", "autogptq"),
    ("cache_dir=/tmp", "cache_dir"),
    ("config=/tmp/config.json", "config"),
    ("some_new_loader_option=1", "some_new_loader_option"),
])
def test_model_args_that_would_read_other_files_are_refused(model, text_file, capsys, arg, needle):
    run_one_line(capsys, eval_args(model, text_file, arg), f"--model-args {needle}")


def test_model_args_values_are_checked_in_a_recipe_before_any_stage():
    from upstack.errors import ConfigError
    from upstack.evaluate.config import EvalConfig, check_config

    check_config(EvalConfig(model="m", perplexity=["x"], model_args={"parallelize": True, "peft": "a"}))
    check_config(EvalConfig(model="m", perplexity=["x"], backend="vllm",
                            model_args={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.9}))
    with pytest.raises(ConfigError, match="subfolder"):
        check_config(EvalConfig(model="m", perplexity=["x"], model_args={"subfolder": "sub"}))
    with pytest.raises(ConfigError, match="load_format"):
        check_config(EvalConfig(model="m", perplexity=["x"], backend="vllm", model_args={"load_format": "pt"}))


def test_an_adapter_inside_the_model_folder_goes_through_the_gate(model, adapter, secret, text_file, tmp_path,
                                                                   capsys):
    """transformers loads adapter_config.json + adapter_model.* found in a model folder on top of it."""
    m = copy_of(model, tmp_path / "m")
    shutil.copy(adapter / "adapter_config.json", m / "adapter_config.json")
    (m / "adapter_model.safetensors").symlink_to(secret)
    run_one_line(capsys, ["eval", m, "--perplexity", text_file, "-q"], "adapter_model.safetensors", "outside")
    (m / "adapter_model.safetensors").unlink()
    torch.save(load_file(adapter / "adapter_model.safetensors"), m / "adapter_model.bin")
    run_one_line(capsys, ["eval", m, "--perplexity", text_file, "-q"], "adapter_model.bin", "--allow-pickle")


def test_gated_model_args_that_pass_are_used(model, adapter, root, shared_data, tmp_path):
    """A clean adapter, delta and tokenizer folder pass the gate and lm-eval uses them."""
    from upstack.evaluate.model_args import check_model_arg_paths

    check_model_arg_paths({"peft": str(adapter), "tokenizer": str(model), "delta": str(model)}, "hf")
    arc = shared_data / "arc_challenge" / "ARC-Challenge-Dev.jsonl"
    if not arc.is_file():
        pytest.skip(f"{arc} not found")
    out = tmp_path / "r.json"
    assert main(["eval", str(model), "--tasks", "arc_challenge_local", "--task-file", f"arc_challenge_local={arc}",
                 "--limit", "2", "--num-fewshot", "0", "--device", "cpu", "-q", "--output", str(out),
                 "--model-args", f"peft={adapter},tokenizer={model}"]) == 0
    assert json.loads(out.read_text())["results"]["arc_challenge_local"]


# ------------------------------------------------------------------------------------------------
# Item 5: a FIFO (or any file that is not a regular file) is refused before it is opened

def upstack_within(seconds, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, "-m", "upstack.cli", *map(str, args)], env=env, capture_output=True,
                           text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        pytest.fail(f"upstack {' '.join(map(str, args[:2]))} still running after {seconds} s (blocked on a FIFO?)")
    return p.returncode, p.stdout, p.stderr, time.monotonic() - start


@pytest.fixture(scope="module")
def fifo_model(root, model):
    m = copy_of(model, root / "fifo-model")
    (m / "model.safetensors").unlink()
    os.mkfifo(m / "model.safetensors")
    return m


@pytest.mark.parametrize("command", ["verify", "inspect", "merge-adapter", "merge-adapter-adapter",
                                     "contamination", "eval"])
def test_a_fifo_named_model_safetensors_is_refused_at_once(fifo_model, model, adapter, text_file, root, command):
    if command == "merge-adapter-adapter":
        a = root / "fifo-adapter"
        if not a.exists():
            copy_of(adapter, a)
            (a / "adapter_model.safetensors").unlink()
            os.mkfifo(a / "adapter_model.safetensors")
        args = ["merge-adapter", model, a, root / "never", "--dry-run"]
        where = "adapter_model.safetensors"
    else:
        args = {"verify": ["verify", fifo_model], "inspect": ["inspect", fifo_model],
                "merge-adapter": ["merge-adapter", fifo_model, adapter, root / "never", "--dry-run"],
                "contamination": ["contamination", fifo_model, "--method", "min-k", "--benchmark", text_file],
                "eval": ["eval", fifo_model, "--perplexity", text_file]}[command]
        where = "model.safetensors"
    rc, out, err, took = upstack_within(120, *args)
    if command == "verify":  # verify reports problems on stdout, one line each, then its verdict
        lines = [ln for ln in out.splitlines() if ln.startswith("problem: ")]
        assert rc == 2 and len(lines) == 1 and "FAILED" in out and "Traceback" not in err, out + err
    else:
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert where in lines[0] and "not a regular file" in lines[0] and "FIFO" in lines[0], lines[0]
    assert took < 60
    assert not (root / "never").exists()


def test_fifo_config_and_tokenizer_files_are_refused(model, tmp_path):
    from upstack.checkpoint import open_checkpoint

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        m = copy_of(model, tmp_path / name)
        (m / name).unlink()
        os.mkfifo(m / name)
        with pytest.raises(CheckpointError, match=f"{re.escape(name)}: is a FIFO .*not a regular file"):
            open_checkpoint(m)


def test_read_safetensors_header_refuses_a_device(tmp_path):
    from upstack.checkpoint import read_safetensors_header

    with pytest.raises(CheckpointError, match="/dev/zero: is a character device, not a regular file"):
        read_safetensors_header("/dev/zero")


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_as_data_says_what_it_is(model, tmp_path, capsys, kind):
    if kind == "fifo":
        data = tmp_path / "rows.jsonl"
        os.mkfifo(data)
        what = "a FIFO"
    else:
        data = tmp_path / "zero.jsonl"
        data.symlink_to("/dev/zero")
        what = "a character device"
    line = run_one_line(capsys, ["sft", model, "--data", data, "--out", tmp_path / "out", "--max-steps", "1"],
                        str(data), "not a regular file", what)
    assert "no such file" not in line
    line = run_one_line(capsys, ["contamination", model, "--method", "min-k", "--benchmark", data],
                        "not a regular file", what)


# ------------------------------------------------------------------------------------------------
# Item 6: a catastrophic regex in alpha_pattern / rank_pattern runs in bounded time

def test_catastrophic_pattern_on_a_module_the_base_lacks_returns_at_once(model, adapter, tmp_path, capsys):
    a = copy_of(adapter, tmp_path / "a")
    w = load_file(a / "adapter_model.safetensors")
    name = "a" * 26 + "!"  # a 27-character module name: (a+)+ takes seconds against it, doubling per character
    w[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(4, 64)
    w[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(64, 4)
    save_file(w, a / "adapter_model.safetensors")
    edit_config(a, alpha_pattern={"(a+)+": 3})
    start = time.monotonic()
    run_one_line(capsys, ["merge-adapter", model, a, tmp_path / "out", "--dry-run"], "no weight in")
    assert time.monotonic() - start < 2.0


def test_catastrophic_pattern_on_real_module_names_is_bounded(model, tmp_path, capsys):
    """`(.|.)*x` backtracks 2^n against an n-character module name under Python's re (a 31-character name:
    minutes). The patterns are matched under a time bound: a pattern that matches nothing in time leaves the
    merge equal to the merge without it; one that runs past the bound is refused in one line naming it."""
    a = make_adapter(model, tmp_path / "a", target_modules=["up_proj"])
    assert main(["merge-adapter", str(model), str(a), str(tmp_path / "plain"), "-q"]) == 0
    plain = merged(tmp_path / "plain")
    for i, pattern in enumerate(["(.|.)*x", "(.|.)*y"]):
        edit_config(a, alpha_pattern={pattern: 3})
        start = time.monotonic()
        rc = main(["merge-adapter", str(model), str(a), str(tmp_path / f"out{i}"), "-q"])
        assert time.monotonic() - start < 10.0  # the matching itself: at most PATTERN_SECONDS
        err = capsys.readouterr().err
        if rc == 0:
            got = merged(tmp_path / f"out{i}")
            assert set(plain) == set(got) and all(torch.equal(plain[k], got[k]) for k in plain)
        else:
            assert rc == 2 and len(err.strip().splitlines()) == 1, err
            assert pattern in err and "too long to match" in err


def test_patterns_select_modules_as_peft_does(model, tmp_path):
    """Regression guard for the bounded matcher: full-name, suffix and alternation keys give PEFT's merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = make_adapter(model, tmp_path / "a", r=4, lora_alpha=8,
                     rank_pattern={"model.layers.0.self_attn.q_proj": 2, "v_proj": 3},
                     alpha_pattern={"layers\\.1\\..*q_proj": 5, "(v|o)_proj": 1.5})
    assert main(["merge-adapter", str(model), str(a), str(tmp_path / "out"), "-q"]) == 0
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), a).merge_and_unload().state_dict()
    for name, t in merged(tmp_path / "out").items():
        assert torch.allclose(t, want[name], rtol=1e-6, atol=1e-7), name


# ------------------------------------------------------------------------------------------------
# Items 7-10: NaN alpha, non-finite modules_to_save, fan_in_fan_out on Linear, r unlike the tensors' rank

def test_nan_inf_and_non_numeric_alpha_and_r_are_refused(model, adapter, tmp_path, capsys):
    bad = [("lora_alpha", float("nan")), ("lora_alpha", float("inf")), ("lora_alpha", 0), ("lora_alpha", True),
           ("r", float("nan")), ("r", 0), ("r", -4), ("r", 2.5), ("r", True)]
    for i, (key, value) in enumerate(bad):
        a = edit_config(copy_of(adapter, tmp_path / f"a{i}"), **{key: value})
        run_one_line(capsys, ["merge-adapter", model, a, tmp_path / "out", "--dry-run"], key)
    assert not (tmp_path / "out").exists()


def test_nonfinite_values_in_modules_saved_whole_are_refused(model, tmp_path, capsys):
    a = make_adapter(model, tmp_path / "a", modules_to_save=["lm_head"])
    w = load_file(a / "adapter_model.safetensors")
    key = next(k for k in w if "lm_head" in k)
    w[key].view(-1)[3] = float("nan")
    save_file(w, a / "adapter_model.safetensors")
    run_one_line(capsys, ["merge-adapter", model, a, tmp_path / "out"], "lm_head.weight", "non-finite",
                 "--allow-nonfinite")
    assert not (tmp_path / "out").exists()
    run_one_line(capsys, ["merge-adapter", model, a, tmp_path / "out", "--dry-run"], "lm_head.weight", "non-finite")
    assert main(["merge-adapter", str(model), str(a), str(tmp_path / "out"), "--allow-nonfinite", "-q"]) == 0
    assert torch.isnan(merged(tmp_path / "out")["lm_head.weight"]).sum() == 1


def test_fan_in_fan_out_on_linear_modules_is_ignored_as_peft_does(model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = make_adapter(model, tmp_path / "a", target_modules=["q_proj", "o_proj"])  # square: shapes cannot tell
    edit_config(a, fan_in_fan_out=True)
    assert main(["merge-adapter", str(model), str(a), str(tmp_path / "out"), "-q"]) == 0
    base = AutoModelForCausalLM.from_pretrained(model)
    want = PeftModel.from_pretrained(base, a).merge_and_unload().state_dict()  # PEFT warns, sets it False
    got = merged(tmp_path / "out")
    changed = 0
    for name, t in got.items():
        assert torch.allclose(t, want[name], rtol=1e-6, atol=1e-7), name
        changed += not torch.equal(t, load_file(model / "model.safetensors")[name])
    assert changed == 4


@pytest.mark.parametrize("flag", [False, True])
def test_conv1d_modules_are_merged_transposed_whatever_the_flag_says(tmp_path, flag):
    """GPT-2's projections are Conv1D (W stored as in x out): PEFT merges them with fan_in_fan_out on, whatever
    the config says."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = build_tiny_model(tmp_path / "gpt2", "gpt2", num_hidden_layers=2, n_positions=64)
    a = make_adapter(base, tmp_path / "a", target_modules=["c_attn", "c_fc", "c_proj"])
    edit_config(a, fan_in_fan_out=flag)
    assert main(["merge-adapter", str(base), str(a), str(tmp_path / "out"), "-q"]) == 0
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), a).merge_and_unload().state_dict()
    got = merged(tmp_path / "out")
    stored = load_file(base / "model.safetensors")
    changed = 0
    for name, t in got.items():
        assert torch.allclose(t, want[name], rtol=1e-6, atol=1e-6), name
        changed += not torch.equal(t, stored[name])
    assert changed == 8  # c_attn, c_fc and both c_proj of both layers


def test_config_r_unlike_the_tensors_rank_is_refused_as_peft_does(model, adapter, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = edit_config(copy_of(adapter, tmp_path / "a"), r=8)
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), a)
    run_one_line(capsys, ["merge-adapter", model, a, tmp_path / "out", "--dry-run"], "rank 4", "r=8",
                 "self_attn.", "the config gives")
    b = edit_config(copy_of(adapter, tmp_path / "b"), rank_pattern={"v_proj": 2})
    run_one_line(capsys, ["merge-adapter", model, b, tmp_path / "out", "--dry-run"], "rank 4", "rank_pattern",
                 "v_proj")


# ------------------------------------------------------------------------------------------------
# Item 12 (adapter parts): one line, exit 2, never a traceback

@pytest.mark.parametrize("changes,needle", [
    ({"alpha_pattern": {"(": 3}}, "alpha_pattern"),
    ({"alpha_pattern": "q_proj"}, "alpha_pattern"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"lora_alpha": 1e308}, "lora_alpha"),
])
def test_bad_adapter_config_values_are_one_line(model, adapter, tmp_path, capsys, changes, needle):
    a = edit_config(copy_of(adapter, tmp_path / "a"), **changes)
    run_one_line(capsys, ["merge-adapter", model, a, tmp_path / "out"], needle)
    assert not (tmp_path / "out").exists()


def test_rank_zero_tensors_are_one_line(model, adapter, tmp_path, capsys):
    a = copy_of(adapter, tmp_path / "a")
    w = load_file(a / "adapter_model.safetensors")
    for k in list(w):
        w[k] = torch.zeros(0, w[k].shape[1]) if "lora_A" in k else torch.zeros(w[k].shape[0], 0)
    save_file(w, a / "adapter_model.safetensors")
    run_one_line(capsys, ["merge-adapter", model, a, tmp_path / "out"], "rank 0")


# ------------------------------------------------------------------------------------------------
# Item 15 (these parts): the disk-full message, a malicious pickle

def test_merge_adapter_disk_full_gives_space_needed_and_free(model, adapter, tmp_path, capsys, monkeypatch):
    from upstack.checkpoint import writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_copy_range", full)
    line = run_one_line(capsys, ["merge-adapter", model, adapter, tmp_path / "out", "-q"], "disk full")
    m = re.search(r"the tensors need about ([\d.]+) (MB|GB), and ([\d.]+) (MB|GB) is free in (\S+) \(", line)
    assert m, line
    scale = {"MB": 1e6, "GB": 1e9}
    need = float(m.group(1)) * scale[m.group(2)]
    assert math.isclose(need, sum(f.stat().st_size for f in model.glob("*.safetensors")), rel_tol=0.05), line
    free = float(m.group(3)) * scale[m.group(4)]
    assert abs(free - shutil.disk_usage(tmp_path).free) < 1e9, line
    assert m.group(5) == str(tmp_path)
    assert not (tmp_path / "out").exists()


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_malicious_pickle_with_allow_pickle_is_one_line(model, tmp_path, capsys):
    m = copy_of(model, tmp_path / "m")
    (m / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _Boom()}, m / "pytorch_model.bin")
    line = run_one_line(capsys, ["inspect", m, "--allow-pickle"], "pytorch_model.bin", "weights_only=True",
                        "posix.system")
    assert "will likely succeed" not in line  # torch's advice to turn weights_only off is not repeated
