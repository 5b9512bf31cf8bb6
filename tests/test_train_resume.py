"""Crash, Ctrl-C and --resume: a killed run resumed from its last checkpoint ends where an uninterrupted run
ends; a resume with another config or model is refused. Real processes, killed for real (slow)."""

import json
import os
import subprocess
import sys

import pytest
from clirun import cli
from tiny import build_tiny_model

torch = pytest.importorskip("torch")


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_hidden_layers=2, vocab_size=256)


# The subprocess registers a step callback that sends its own process SIGINT or SIGKILL right after a
# given optimizer step, then runs the CLI: a real Ctrl-C, a real crash.
_SIGNAL_AT_STEP = """
import os, signal, sys
from upstack.cli import main
from upstack.train.loop import STEP_CALLBACKS
at, how = int(sys.argv[1]), getattr(signal, sys.argv[2])
STEP_CALLBACKS.append(lambda run, step: os.kill(os.getpid(), how) if step == at else None)
sys.exit(main(sys.argv[3:]))
"""


def upstack(*args, signal_at=None):
    """`upstack ARGS` in a new process; signal_at="STEP:KILL" or "STEP:INT" sends that signal after STEP."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    step, _, how = (signal_at or "0:INT").partition(":")
    cmd = [sys.executable, "-c", _SIGNAL_AT_STEP, step, {"KILL": "SIGKILL", "INT": "SIGINT"}[how]]
    return subprocess.run([*cmd, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(a, b):
    """Bit for bit: a resumed run computes what the uninterrupted run computes."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def losses(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in recs if r["type"] == "train"]


def test_killed_sft_run_resumes_to_the_same_result(model_dir, tmp_path):
    from upstack.train.sft import SFTConfig, sft

    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(12)]
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, work = tmp_path / "out", tmp_path / "out.work"
    args = ["sft", model_dir, "--data", data, "--out", out, "--max-steps", 8, "--save-steps", 3, "--batch-size", 2,
            "--max-length", 64, "--lr", "1e-3", "--logging-steps", 1, "--no-tensorboard", "--no-packing"]
    p = upstack(*args, signal_at="5:KILL")              # a hard crash after step 5
    assert p.returncode == -9, p.stderr
    assert not out.exists() and (work / "checkpoint-3").is_dir() and not (work / "checkpoint-6").exists()
    rc, err = cli(*args)                                 # without --resume: refused, nothing lost
    assert rc == 2 and "--resume" in err
    rc, err = cli(*args, "--lr", "2e-3", "--resume")     # another config: refused, says what differs
    assert rc == 2 and "learning_rate" in err
    rc, err = cli(*args, "--resume")
    assert rc == 0, err
    assert not work.exists()

    ref = tmp_path / "ref"
    sft(SFTConfig(model=str(model_dir), data=[str(data)], out=str(ref), max_steps=8, save_steps=0, batch_size=2,
                  max_length=64, learning_rate=1e-3, logging_steps=1, tensorboard=False, progress=False, packing=False))
    assert_same_weights(out, ref)
    got, want = losses(out), losses(ref)
    assert [s for s, _ in got] == list(range(1, 9))     # each step logged once, across the crash
    assert got == want


def test_interrupted_dpo_run_saves_and_resumes_with_cached_reference(model_dir, tmp_path):
    from upstack.train.dpo import DPOConfig, dpo

    rows = [{"prompt": f"Is {i} even?", "chosen": "Yes." if i % 2 == 0 else "No.",
             "rejected": "No." if i % 2 == 0 else "Yes."} for i in range(8)]
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, work = tmp_path / "out", tmp_path / "out.work"
    args = ["dpo", model_dir, "--data", data, "--out", out, "--max-steps", 6, "--save-steps", 0, "--batch-size", 2,
            "--lr", "1e-3", "--logging-steps", 1, "--no-tensorboard"]
    p = upstack(*args, signal_at="4:INT")               # Ctrl-C after step 4: checkpoint, then exit 130
    assert p.returncode == 130, p.stderr
    assert "interrupted" in p.stderr
    assert (work / "checkpoint-4").is_dir() and (work / "ref_logps.safetensors").is_file() and not out.exists()
    other = build_tiny_model(tmp_path / "other", "llama", num_hidden_layers=2, vocab_size=256, seed=3)
    rc, err = cli("dpo", other, *args[2:], "--resume")
    assert rc == 2 and "another model" in err
    rc, err = cli(*args, "--resume")
    assert rc == 0, err

    ref = tmp_path / "ref"
    dpo(DPOConfig(model=str(model_dir), data=[str(data)], out=str(ref), max_steps=6, save_steps=0, batch_size=2,
                  learning_rate=1e-3, logging_steps=1, tensorboard=False, progress=False))
    assert_same_weights(out, ref)
    assert losses(out) == losses(ref)
