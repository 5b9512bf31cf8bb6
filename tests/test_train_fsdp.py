"""FSDP2 for real on two CPU processes (configs/accelerate/fsdp-cpu2.yaml, gloo): parameters sharded
(rank 0 holds about half), the loss curve and final weights of one process with the same global batch,
frozen layers untouched, sharded checkpoints a killed run resumes from, LoRA; a launch that asks for FSDP
but cannot shard is refused."""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from tiny import build_tiny_model

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent
FSDP_CPU2 = REPO / "configs" / "accelerate" / "fsdp-cpu2.yaml"
TOL = 1e-4

slow = pytest.mark.slow
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# A step callback that SIGKILLs its own process after a given step, then the CLI (as test_train_resume).
_KILL_AT_STEP = """
import os, signal, sys
from upstack.cli import main
from upstack.train.loop import STEP_CALLBACKS
at = int(sys.argv[1])
STEP_CALLBACKS.append(lambda run, step: os.kill(os.getpid(), signal.SIGKILL) if step == at else None)
sys.exit(main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, *args, kill_at=None):
    """`upstack ARGS` under accelerate launch with the FSDP CPU config (two processes)."""
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("UPSTACK_SHARDING", None)
    if kill_at is None:
        target = ["-m", "upstack.cli"]
    else:
        script = tmp_path / "kill_at_step.py"
        script.write_text(_KILL_AT_STEP)
        target = [str(script), str(kill_at)]
    cmd = ["accelerate", "launch", "--config_file", str(FSDP_CPU2), "--main_process_port", str(free_port()),
           *target, *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def one_process(*args):
    from upstack.cli import main

    assert main([str(a) for a in args]) == 0


def records(out):
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == "train"], next(r for r in recs if r["type"] == "start")


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def assert_close_weights(a, b, atol=TOL):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst <= atol, worst


def assert_same_curve(a, b):
    (ca, _), (cb, _) = records(a), records(b)
    assert len(ca) == len(cb) > 0
    for x, y in zip(ca, cb):
        assert x["tokens"] == y["tokens"]
        assert x["loss"] == pytest.approx(y["loss"], abs=TOL)
        if "grad_norm" in x:
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)


def assert_sharded_start(out):
    _, start = records(out)
    assert start["sharding"] == "fsdp" and start["processes"] == 2 and start["weights_from_rank0"] is True
    assert 0.4 * start["total"] < start["params_local"] < 0.6 * start["total"], start


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama whose upstack.json says layer 1 was added by an interleave up-scale (--train-layers new)."""
    path = build_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_hidden_layers=2, vocab_size=256)
    (path / "upstack.json").write_text(json.dumps({"upscale": {"method": "interleave", "layer_map": [0, 0],
                                                               "new_layers": [1], "source": "x"}}))
    return path


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """A tiny Qwen2 with tied input/output embeddings (one tensor under two names)."""
    return build_tiny_model(tmp_path_factory.mktemp("m") / "qwen2", "qwen2", num_hidden_layers=2, vocab_size=256,
                            tie_word_embeddings=True)


def sft_data(tmp_path):
    data = tmp_path / "sft.jsonl"
    rows = [{"instruction": "Say " + "hi " * (i % 5 + 1), "output": "ok " * (i % 7 + 1)} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _vocab(model_dir):
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def data_for(stage, tmp_path):
    if stage == "pretrain":
        from tiny import CORPUS

        data = tmp_path / "corpus.txt"
        data.write_text("\n\n".join(CORPUS[:8]))
        return data
    if stage == "sft":
        return sft_data(tmp_path)
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Is {i} even?", "chosen": "Yes." if i % 2 == 0 else "No, it is odd.",
             "rejected": "No." if i % 2 == 0 else "Yes it is."} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


# stage, extra options: pretrain trains only the up-scale's new layer, DPO-precomputed a layer range,
# so frozen tensors and optimizer state are checked under FSDP too. DPO at 1e-3: at 5e-3 Adam turns
# float32 summation-order noise in near-zero gradient elements into weight differences up to 1.6e-4
# after 4 steps -- the same under DDP (measured), so not a sharding effect.
CASES = {
    "pretrain-new-layers": ("pretrain", ["--seq-len", "32", "--train-layers", "new", "--lr", "5e-3"]),
    "sft-tied-bf16-mixed": ("sft", ["--max-length", "64", "--lr", "5e-3", "--dtype", "bf16-mixed",
                                    "--gradient-checkpointing", "--eval-fraction", "0.2"]),
    "dpo-precomputed-ref": ("dpo", ["--max-length", "64", "--train-layers", "0-0", "--lr", "1e-3"]),
    "dpo-ref-in-memory": ("dpo", ["--max-length", "64", "--no-precompute-ref", "--lr", "1e-3"]),
    # the memory-lean loss (head applied a few positions at a time) with the head's weight sharded
    "sft-chunked-loss": ("sft", ["--max-length", "64", "--lr", "5e-3"]),
}


@slow
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_two_processes_match_one_process(model_dir, tied_model_dir, tmp_path, case, monkeypatch):
    stage, extra = CASES[case]
    if "chunked" in case:   # both runs (the launch copies the environment) score 8 positions per chunk
        import upstack.lm

        monkeypatch.setenv("UPSTACK_LOSS_CHUNK_MB", str(8 * 4 * _vocab(model_dir) / 2**20))
        chunks = []   # (positions, positions per chunk) of each call of the one-process run
        real = upstack.lm._head_nll
        monkeypatch.setattr(upstack.lm, "_head_nll",
                            lambda h, w, b, y, step: chunks.append((h.shape[0], step)) or real(h, w, b, y, step))
    data = data_for(stage, tmp_path)
    model = tied_model_dir if "tied" in case else model_dir
    common = [stage, model, "--data", data, "--max-steps", "4", "--batch-size", "1",
              "--logging-steps", "1", "--no-tensorboard", "-q", "--seed", "3", *extra]
    two, one = tmp_path / "two", tmp_path / "one"
    # FSDP with accumulation 2 (2 processes x 1 x 2) against one process with accumulation 4: global batch 4.
    p = launch(tmp_path, *common, "--out", two, "--grad-accum", "2", "--save-steps", "2", "--keep-checkpoints")
    assert p.returncode == 0, p.stderr[-4000:]
    one_process(*common, "--out", one, "--grad-accum", "4", "--save-steps", "0")
    assert_sharded_start(two)
    assert records(one)[1]["sharding"] == "none" and records(one)[1]["params_local"] == records(one)[1]["total"]
    assert_same_curve(one, two)
    assert_close_weights(one, two)  # also: the same tensor names (a tied weight saved once)
    if "chunked" in case:
        # the one-process run scored 8 positions a chunk, in several chunks a batch (batches of at most 8
        # positions take the one-call path)
        assert chunks and all(step == 8 and n > 8 for n, step in chunks)
    assert json.loads((two / "config.json").read_text())["num_hidden_layers"] == 2
    if "--eval-fraction" in extra:  # held-out loss under FSDP: every process runs the same forward passes
        evals = [[r for r in map(json.loads, (o / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]
                 for o in (one, two)]
        assert evals[0] and evals[0][-1]["eval_loss"] == pytest.approx(evals[1][-1]["eval_loss"], abs=TOL)
    if "--train-layers" in extra:
        frozen_layer = "model.layers.0." if stage == "pretrain" else "model.layers.1."
        before, after = weights(model_dir), weights(two)
        frozen = [k for k in before if not k.startswith("model.layers.") or k.startswith(frozen_layer)]
        assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
        assert any(not torch.equal(before[k], after[k]) for k in before if k not in frozen)
        # The sharded checkpoint holds optimizer state for the trained layer only.
        from torch.distributed.checkpoint import FileSystemReader

        meta = FileSystemReader(str(two.parent / "two.work" / "checkpoint-2" / "sharded")).read_metadata()
        optim = [k for k in meta.state_dict_metadata if k.startswith("optim.state.")]
        assert optim and not any(k.startswith(tuple(f"optim.state.{f}" for f in frozen)) for k in optim)


@slow
def test_fsdp_killed_run_resumes_to_the_uninterrupted_result(model_dir, tmp_path):
    data = sft_data(tmp_path)
    common = ["sft", model_dir, "--data", data, "--max-steps", "5", "--batch-size", "2", "--lr", "5e-3",
              "--logging-steps", "1", "--max-length", "64", "--no-tensorboard", "-q", "--save-steps", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = launch(tmp_path, *common, "--out", full)
    assert p.returncode == 0, p.stderr[-4000:]
    # Both processes SIGKILL themselves after step 3: checkpoint-2 (sharded) is the latest.
    p = launch(tmp_path, *common, "--out", cut, kill_at=3)
    assert p.returncode != 0
    work = tmp_path / "cut.work"
    ckpt = work / "checkpoint-2"
    assert {f.name for f in (ckpt / "sharded").iterdir()} >= {"__0_0.distcp", "__1_0.distcp", ".metadata"}
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()
    assert not (work / "checkpoint-4").exists() and not cut.exists()
    # Another number of processes: refused in one line before any work.
    import contextlib
    import io

    from upstack.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(a) for a in common] + ["--out", str(cut), "--resume"])
    assert rc == 2 and "processes: 2 -> 1" in err.getvalue() and "sharding: fsdp -> none" in err.getvalue()
    assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    assert ckpt.is_dir()
    p = launch(tmp_path, *common, "--out", cut, "--resume")
    assert p.returncode == 0, p.stderr[-4000:]
    assert_close_weights(full, cut, atol=1e-6)
    (cf, _), (cc, _) = records(full), records(cut)
    resumed = {r["step"]: r["loss"] for r in cc}
    assert sorted(resumed) == [1, 2, 3, 4, 5]
    for r in cf:
        assert resumed[r["step"]] == pytest.approx(r["loss"], abs=1e-6)


@slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16-mixed"])   # bf16-mixed: a bf16 base with fp32 adapters
def test_fsdp_lora_matches_one_process(model_dir, tmp_path, dtype):
    data = sft_data(tmp_path)
    common = ["sft", model_dir, "--data", data, "--max-steps", "3", "--batch-size", "2", "--lr", "5e-3",
              "--logging-steps", "1", "--max-length", "64", "--no-tensorboard", "-q", "--save-steps", "0",
              "--lora", "--lora-r", "4", "--lora-dropout", "0", "--dtype", dtype]
    two, one = tmp_path / "two", tmp_path / "one"
    p = launch(tmp_path, *common, "--out", two, "--grad-accum", "1")
    assert p.returncode == 0, p.stderr[-4000:]
    one_process(*common, "--out", one, "--grad-accum", "2")
    assert_sharded_start(two)
    assert_same_curve(one, two)
    assert_close_weights(one, two)
    from safetensors.torch import load_file

    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    assert all(torch.allclose(a[k], b[k], atol=TOL) for k in a)


@pytest.mark.parametrize("env", [{"UPSTACK_SHARDING": "fsdp"}, {"ACCELERATE_USE_FSDP": "true"}])
def test_fsdp_with_one_process_is_refused_before_any_work(model_dir, tmp_path, monkeypatch, capsys, env):
    from upstack.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    rc = main(["sft", str(model_dir), "--data", str(sft_data(tmp_path)), "--out", str(out), "-q", "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "asks for FSDP but runs 1 process" in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "out.work").exists()


def test_qlora_under_fsdp_is_refused(monkeypatch):
    from types import SimpleNamespace

    from upstack.errors import ConfigError
    from upstack.train.sharding import check_fsdp

    monkeypatch.setenv("UPSTACK_SHARDING", "fsdp")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="--qlora under FSDP"):
        check_fsdp(SimpleNamespace(qlora=True))
    monkeypatch.setenv("UPSTACK_SHARDING", "zero")
    with pytest.raises(ConfigError, match="UPSTACK_SHARDING"):
        check_fsdp(SimpleNamespace(qlora=False))


def launcher_env(config: Path) -> tuple:
    """(accelerate launch's parsed args, the environment it gives each process) for a config file, as
    `accelerate launch --config_file CONFIG -m upstack.cli ...` computes them (nothing is started)."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "upstack.cli"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


def test_fsdp_config_turns_upstack_sharding_on(monkeypatch):
    from types import SimpleNamespace

    from upstack.train.sharding import check_fsdp

    args, env = launcher_env(FSDP_CPU2)
    assert args.num_processes == 2 and env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for k, v in env.items():
        if k.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("UPSTACK_SHARDING", "")  # recorded, so what check_fsdp sets is undone
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert check_fsdp(SimpleNamespace(qlora=False))
    # accelerate (and transformers' loading) no longer see FSDP; upstack remembers it
    assert os.environ["ACCELERATE_USE_FSDP"] == "false" and os.environ["UPSTACK_SHARDING"] == "fsdp"


def test_deepspeed_zero3_config_is_accepted_and_planned(model_dir, tmp_path, monkeypatch, capsys):
    """deepspeed is not installed here (and runs on CUDA only): the config is parsed by accelerate's
    launcher and --dry-run plans the run under the environment it would give each process."""
    from upstack.cli import main

    args, env = launcher_env(REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml")
    assert args.use_deepspeed and args.zero_stage == 3 and args.num_processes == 8
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    assert "gradient_accumulation_steps" not in args.deepspeed_fields_from_accelerate_config  # --grad-accum's
    for k, v in env.items():
        if k.startswith("ACCELERATE_"):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("WORLD_SIZE", str(args.num_processes))
    monkeypatch.setenv("UPSTACK_SHARDING", "")  # recorded, so what check_fsdp sets is undone
    out = tmp_path / "out"
    assert main(["dpo", str(model_dir), "--data", "x.jsonl", "--out", str(out), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    note = plan["launch"].pop("note")
    assert plan["launch"] == {"sharding": "deepspeed", "processes": 8, "zero_stage": 3}
    assert note.startswith("accelerate's DeepSpeed ZeRO-3 (needs the deepspeed package and CUDA GPUs)")
    assert not out.exists()


def test_fsdp_dry_run_with_one_process_is_refused(model_dir, monkeypatch, capsys):
    from upstack.cli import main

    monkeypatch.setenv("UPSTACK_SHARDING", "fsdp")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["sft", str(model_dir), "--data", "x.jsonl", "--out", "o", "--dry-run"]) == 2
    assert "REFUSED: the launch asks for FSDP but runs 1 process" in capsys.readouterr().out


def test_fsdp_configs_ask_for_fsdp2():
    yaml = pytest.importorskip("yaml")
    for name in ("fsdp.yaml", "fsdp-cpu2.yaml"):
        conf = yaml.safe_load((REPO / "configs" / "accelerate" / name).read_text())
        assert conf["distributed_type"] == "FSDP" and conf["fsdp_config"]["fsdp_version"] == 2
        assert conf["mixed_precision"] == "no"
    assert yaml.safe_load(FSDP_CPU2.read_text())["num_processes"] == 2
