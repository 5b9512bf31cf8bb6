"""`upstack eval` under two CPU processes (`accelerate launch --multi_gpu --num_processes 2`, no GPU): lm-eval splits the
documents between the processes, the main process alone writes, and every score and per-document
log-likelihood equals a one-process run's."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import SHARED_DATA
from tiny import build_tiny_model

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(out_file):
    """{(task, doc_id): per-choice log-likelihoods or generated text} from the --log-samples files."""
    res = json.loads(out_file.read_text())
    got = {}
    for task, path in res["samples"].items():
        for line in open(path, encoding="utf-8"):
            rec = json.loads(line)
            got[(task, rec["doc_id"], rec.get("filter"))] = rec["filtered_resps"]
    return res, got


def test_two_processes_give_the_one_process_scores(tmp_path):
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data samples not found at {SHARED_DATA} (set UPSTACK_SHARED_DATA)")
    model = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2, vocab_size=260)
    args = ["eval", str(model), "--tasks", "arc_challenge_local,hellaswag_local,gsm8k_local",
            "--data-dir", str(SHARED_DATA), "--limit", "9", "--num-fewshot", "1", "--max-gen-toks", "8",
            "--batch-size", "2", "--log-samples", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    two = tmp_path / "two" / "r.json"
    two.parent.mkdir()
    p = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        "-m", "upstack.cli", *args, "--output", str(two)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    one = tmp_path / "one" / "r.json"
    one.parent.mkdir()
    p = subprocess.run([sys.executable, "-m", "upstack.cli", *args, "--output", str(one)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (r2, s2), (r1, s1) = samples(two), samples(one)
    assert r2["processes"] == 2 and r1["processes"] == 1     # the documents were split between two processes
    assert sorted(p.name for p in two.parent.iterdir() if p.name.endswith(".json")) == ["r.json"]
    assert r2["n_samples"] == r1["n_samples"] and r1["n_samples"]["arc_challenge_local"]["effective"] == 9
    assert set(r2["results"]) == set(r1["results"])
    for task, metrics in r1["results"].items():
        for name, value in metrics.items():
            assert r2["results"][task][name] == pytest.approx(value, abs=1e-9), (task, name)
    assert set(s2) == set(s1) and len(s1) >= 27
    for key, resp in s1.items():
        if isinstance(resp, list) and resp and isinstance(resp[0], list):   # [[logprob, is_greedy], ...]
            assert [r[0] for r in s2[key]] == pytest.approx([r[0] for r in resp], abs=1e-4), key
        else:
            assert s2[key] == resp, key


def test_a_task_with_fewer_documents_than_processes_is_scored_whole(tmp_path):
    """One document, two processes: lm-eval cannot give a process an empty share, so each process scores the
    whole task, the main process alone writes, and the result equals one process's (`processes: 1`)."""
    if shutil.which("accelerate") is None:
        pytest.skip("the accelerate launcher is not on PATH")
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data samples not found at {SHARED_DATA} (set UPSTACK_SHARED_DATA)")
    model = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2, vocab_size=260)
    args = ["eval", str(model), "--tasks", "arc_challenge_local", "--data-dir", str(SHARED_DATA), "--limit", "1",
            "--num-fewshot", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    two, one = tmp_path / "two.json", tmp_path / "one.json"
    p = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                        "-m", "upstack.cli", *args, "--output", str(two)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "upstack.cli", *args, "--output", str(one)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r2, r1 = json.loads(two.read_text()), json.loads(one.read_text())
    assert r2["processes"] == 1 and r2["n_samples"] == r1["n_samples"]
    assert r2["results"] == r1["results"]
