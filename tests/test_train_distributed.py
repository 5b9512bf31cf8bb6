"""Two CPU processes (accelerate launch, gloo) give the loss curve of one process with the same global batch."""

import json
import os
import shutil
import socket
import subprocess

import pytest
from tiny import build_tiny_model

torch = pytest.importorskip("torch")



pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def curve(out):
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["type"] == "train"], next(r for r in recs if r["type"] in ("start",))


@pytest.mark.parametrize("stage", ["sft", "dpo", "sft-lora"])
def test_two_processes_match_one_process_with_accumulation(tmp_path, stage):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    lora = stage.endswith("-lora")    # --lora under DDP: the adapters' loss curve equals one process's too
    stage = stage.removesuffix("-lora")
    model = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2, vocab_size=256)
    data = tmp_path / "d.jsonl"
    if stage == "sft":
        # Different lengths, so the per-process token counts differ and normalisation matters.
        rows = [{"instruction": "Say " + "hi " * (i % 5 + 1), "output": "ok " * (i % 7 + 1)} for i in range(16)]
    else:
        rows = [{"prompt": f"Is {i} even?", "chosen": "Yes." if i % 2 == 0 else "No, it is odd.",
                 "rejected": "No." if i % 2 == 0 else "Yes it is."} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [stage, str(model), "--data", str(data), "--max-steps", "4", "--batch-size", "2", "--lr", "5e-3",
              "--logging-steps", "1", "--max-length", "64", "--no-tensorboard", "-q", "--save-steps", "0",
              *(["--lora", "--lora-r", "4", "--lora-dropout", "0"] if lora else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    two = tmp_path / "two"
    p = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        "-m", "upstack.cli", *common, "--out", str(two), "--grad-accum", "1"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    from upstack.cli import main

    one = tmp_path / "one"
    assert main([*common, "--out", str(one), "--grad-accum", "2"]) == 0
    (c2, start2), (c1, start1) = curve(two), curve(one)
    assert start2["processes"] == 2 and start1["processes"] == 1
    # DDP: every process holds the whole model (FSDP is tests/test_train_fsdp.py)
    assert start2["sharding"] == "ddp" and start1["sharding"] == "none"
    if lora:  # every process holds the base and the adapters ("total" counts the base)
        assert start2["params_local"] == start1["params_local"] == start1["total"] + start1["trainable"]
        assert start2["lora"]["modules"] == start1["lora"]["modules"] > 0 and start2["trainable"] < start2["total"]
    else:
        assert start2["params_local"] == start2["total"] == start1["params_local"]
    assert start2["global_batch"] == start1["global_batch"] == 4
    assert len(c1) == len(c2) == 4
    for a, b in zip(c1, c2):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
    if stage == "dpo":
        assert c1[-1]["rewards/margin"] == pytest.approx(c2[-1]["rewards/margin"], rel=1e-3, abs=1e-4)


def test_a_work_folder_not_every_process_sees_is_refused(tmp_path):
    """Process 1 of 2 cannot read the run.json process 0 wrote (OUT on a node-local disk of another node):
    one ConfigError naming the folder and the process, before any step; a shared folder passes."""
    from types import SimpleNamespace

    import torch

    from upstack.errors import ConfigError
    from upstack.train.run import check_shared_work_dir

    def fake_run(work, rank):
        # gather: process 0 (which wrote the file) reports 0, this process its own flag
        return SimpleNamespace(world=2, rank=rank, work=work, accelerator=SimpleNamespace(
            device="cpu", gather=lambda t: torch.cat([torch.tensor([0]), t])))

    text = '{"stage": "sft"}\n'
    elsewhere = tmp_path / "node1-local" / "out.work"        # what process 1 sees: no run.json
    with pytest.raises(ConfigError, match=r"not on storage every process sees \(process\(es\) 1 cannot read"):
        check_shared_work_dir(fake_run(elsewhere, 1), text)
    shared = tmp_path / "shared" / "out.work"
    shared.mkdir(parents=True)
    (shared / "run.json").write_text(text)
    check_shared_work_dir(fake_run(shared, 1), text)        # the same file: passes
    (shared / "run.json").write_text('{"stage": "dpo"}\n')   # a stale run.json of another run: refused
    with pytest.raises(ConfigError):
        check_shared_work_dir(fake_run(shared, 1), text)
