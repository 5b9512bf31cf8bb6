"""Faults: a changed input, a second writer, a kill mid-write, SIGTERM, a full disk, a very long document.

Real processes where the fault is a process (a second writer, SIGKILL, SIGTERM); an in-process OSError
ENOSPC for a full disk."""

import errno
import json
import os
import re
import subprocess
import sys
import time

import pytest
from clirun import cli
from tiny import build_tiny_model

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_hidden_layers=2, vocab_size=256)


def upstack_process(*args):
    """`upstack ARGS -q` in a new process (what a user sees on stderr): (exit code, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-m", "upstack.cli", str(args[0]), "-q", *map(str, args[1:])], env=env,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stderr


# A CLI process that stops at a chosen point: inside the output writer once the content is written but
# before the rename ("write"), or after a training step ("step:N"); there it waits for a file to appear
# ("wait") or sends itself a signal (SIGKILL, SIGTERM). It touches FLAG.ready when it gets there.
_STOPPING_CLI = """
import contextlib, os, signal, sys, time
import upstack.outputs as outputs
where, how, flag = sys.argv[1], sys.argv[2], sys.argv[3]

def stop():
    open(flag + ".ready", "w").close()
    if how == "wait":
        while not os.path.exists(flag):
            time.sleep(0.05)
    else:
        os.kill(os.getpid(), getattr(signal, how))
        time.sleep(30)

if where == "write":
    real = outputs.atomic_output_dir
    @contextlib.contextmanager
    def stopping(out, *a, **k):
        with real(out, *a, **k) as tmp:
            yield tmp
            stop()
    outputs.atomic_output_dir = stopping
else:
    from upstack.train.loop import STEP_CALLBACKS
    at = int(where.split(":")[1])
    STEP_CALLBACKS.append(lambda run, step: stop() if step == at else None)
from upstack.cli import main
sys.exit(main(sys.argv[4:]))
"""


def start(tmp_path, where, how, *args):
    """Start `upstack ARGS` stopping at `where` by `how`; wait until it gets there; (process, flag)."""
    flag = tmp_path / f"flag-{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    p = subprocess.Popen([sys.executable, "-c", _STOPPING_CLI, where, how, str(flag), *map(str, args)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (flag.parent / (flag.name + ".ready")).exists():
        if p.poll() is not None or time.time() > deadline:
            out, err = p.communicate(timeout=30) if p.poll() is not None else ("", "timeout")
            pytest.fail(f"the writer ended before its stop point: {p.returncode}\n{err}")
        time.sleep(0.05)
    return p, flag


def finish(p, timeout=240):
    out, err = p.communicate(timeout=timeout)
    return p.returncode, err


def temp_siblings(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def sft_rows(path, n=12, answer="It is"):
    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"{answer} {2 * i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_command(model_dir, tmp_path, max_steps, save_steps):
    """(args of an `upstack sft` on 12 rows, its data file, OUT, OUT.work)."""
    data = sft_rows(tmp_path / "a.jsonl")
    out = tmp_path / "out"
    args = ["sft", model_dir, "--data", data, "--out", out, "--max-steps", max_steps, "--save-steps", save_steps,
            *SFT_ARGS]
    return args, data, out, tmp_path / "out.work"


SFT_ARGS = ["--batch-size", 2, "--max-length", 64, "--lr", "1e-3", "--logging-steps", 1, "--no-tensorboard",
            "--no-packing"]


# ------------------------------------------------------------------------------------------------
# Case 1: caches know their inputs

def test_replaced_corpus_is_tokenized_again_not_reused(model_dir, tmp_path):
    corpus, held = tmp_path / "c.txt", tmp_path / "e.txt"
    corpus.write_text("too short\n")
    held.write_text("short too\n")
    out = tmp_path / "pt"
    args = ["pretrain", model_dir, "--data", corpus, "--eval-data", held, "--out", out, "--seq-len", 64,
            "--max-steps", 2, "--eval-fraction", 0, "--no-tensorboard"]
    rc, err = cli(*args)
    assert rc == 2 and "less than one block" in err and "training text" in err
    corpus.write_text("".join(f"Document {i} says that {i} times two is {2 * i}.\n\n" for i in range(200)))
    rc, err = cli(*args)                      # the training text is read again; now the eval text is short
    assert rc == 2 and "eval text" in err, err
    held.write_text("".join(f"Held-out line {i}: {i} plus one is {i + 1}.\n\n" for i in range(60)))
    rc, err = cli(*args)
    assert rc == 0, err
    summary = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["documents"] == 200


def test_token_file_rebuilds_when_its_key_differs(model_dir, tmp_path):
    """The token cache itself is keyed (not only the run): a file edited under the same run is re-read."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from upstack.data.loading import parse_data_spec
    from upstack.train.pretrain import PretrainConfig, token_file

    data = tmp_path / "c.txt"
    data.write_text("one two three\n")
    cfg = PretrainConfig(model=str(model_dir), data=[str(data)], out=str(tmp_path / "o"), progress=False)
    run = SimpleNamespace(work=tmp_path / "o.work", is_main=True, cfg=cfg, log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, meta = token_file(run, [parse_data_spec(str(data))], tok, "train")
    _, again = token_file(run, [parse_data_spec(str(data))], tok, "train")
    assert again == meta
    data.write_text("one two three four five six seven\n")
    _, new = token_file(run, [parse_data_spec(str(data))], tok, "train")
    assert new["tokens"] > meta["tokens"] and new["key"] != meta["key"]


# ------------------------------------------------------------------------------------------------
# Case 2: a resume belongs to its inputs

@pytest.mark.slow
def test_explicit_resume_with_changed_data_is_refused_naming_the_file(model_dir, tmp_path):
    args, data, out, work = sft_command(model_dir, tmp_path, 6, 2)
    p, _ = start(tmp_path, "step:3", "SIGKILL", *args)
    assert finish(p)[0] == -9 and (work / "checkpoint-2").is_dir()
    sft_rows(data, answer="The sum is")
    rc, err = cli(*args, "--resume")
    assert rc == 2 and "data file" in err and str(data) in err, err
    assert (work / "checkpoint-2").is_dir()   # nothing lost


@pytest.mark.slow
def test_recipe_starts_a_stage_afresh_when_its_data_changed(model_dir, tmp_path, caplog):
    import logging

    from upstack.pipeline import load_recipe, run_recipe, stage_done

    data = sft_rows(tmp_path / "a.jsonl")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""\
stages:
  sft:
    type: sft
    model: {model_dir}
    data: [{data}]
    max_steps: 6
    save_steps: 2
    batch_size: 2
    max_length: 64
    learning_rate: 1.0e-3
    logging_steps: 1
    tensorboard: false
    packing: false
    progress: false
""")
    run_dir = tmp_path / "run"
    p, _ = start(tmp_path, "step:5", "SIGKILL", "run", recipe, "--out", run_dir)
    assert finish(p)[0] == -9 and (run_dir / "sft.work" / "checkpoint-4").is_dir()
    sft_rows(data, answer="The sum is")
    logs = []
    with caplog.at_level(logging.INFO, logger="upstack"):
        assert run_recipe(load_recipe(recipe, run_dir), quiet=True, log=logs.append)["stages"] == {"sft": "ran"}
    text = caplog.text
    assert "resuming from" not in text and "starting over" in text and "data file" in text, text
    clean = tmp_path / "clean"
    run_recipe(load_recipe(recipe, clean), quiet=True, log=logs.append)
    assert same_weights(run_dir / "sft", clean / "sft")
    assert stage_done(load_recipe(recipe, run_dir).stages["sft"], load_recipe(recipe, run_dir))
    # a finished stage whose data file changes runs again
    sft_rows(data, answer="Sum:")
    assert run_recipe(load_recipe(recipe, run_dir), quiet=True, log=logs.append)["stages"] == {"sft": "ran"}


# ------------------------------------------------------------------------------------------------
# Case 9: one writer per output

def test_second_upscale_into_the_same_output_is_refused_naming_the_first(model_dir, tmp_path):
    out = tmp_path / "up"
    first, flag = start(tmp_path, "write", "wait", "upscale", model_dir, out, "--m", 1)
    rc, err = cli("upscale", model_dir, out, "--m", 1)
    assert rc == 2 and f"{out} is being written by process {first.pid} (started" in err, err
    assert "wait for it or stop it" in err and len(err.strip().splitlines()) == 1
    flag.touch()
    rc, err = finish(first)
    assert rc == 0, err
    assert (out / "config.json").is_file() and temp_siblings(out) == []
    rc, err = cli("upscale", model_dir, out, "--m", 1)   # after it: the ordinary exists check
    assert rc == 2 and "already exists" in err


def test_second_run_of_a_run_folder_is_refused(model_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  upscale:\n    source: {model_dir}\n    m: 1\n")
    run_dir = tmp_path / "run"
    first, flag = start(tmp_path, "write", "wait", "run", recipe, "--out", run_dir)
    rc, err = cli("run", recipe, "--out", run_dir)
    assert rc == 2 and f"{run_dir} is being run by process {first.pid}" in err, err
    flag.touch()
    rc, err = finish(first)
    assert rc == 0, err
    rc, err = cli("run", recipe, "--out", run_dir)
    assert rc == 0 and not (tmp_path / ".run.lock").exists()


@pytest.mark.slow
def test_second_training_run_into_the_same_output_is_refused(model_dir, tmp_path):
    args, data, out, _ = sft_command(model_dir, tmp_path, 3, 0)
    first, flag = start(tmp_path, "step:1", "wait", *args)
    rc, err = cli(*args)
    assert rc == 2 and f"out.work is being trained by process {first.pid}" in err, err
    rc, err = cli(*args, "--resume")
    assert rc == 2 and "being trained by" in err
    flag.touch()
    assert finish(first)[0] == 0
    assert (out / "model.safetensors").is_file()


def test_a_stale_lock_of_a_dead_process_is_taken_over(model_dir, tmp_path):
    out = tmp_path / "up"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".up.lock").write_text(f"{dead.stdout.strip()} 2020-01-01T00:00:00\n")
    rc, err = cli("upscale", model_dir, out, "--m", 1)
    assert rc == 0, err
    assert (out / "config.json").is_file() and temp_siblings(out) == []


# ------------------------------------------------------------------------------------------------
# Case 10: kills and SIGTERM leave nothing behind

def test_killed_writer_leftovers_are_removed_by_the_next_run(model_dir, tmp_path):
    out = tmp_path / "up"
    p, _ = start(tmp_path, "write", "SIGKILL", "upscale", model_dir, out, "--m", 1)
    assert finish(p)[0] == -9
    left = [n for n in temp_siblings(out) if n.startswith(".up.tmp-")]
    assert left == [n for n in left if n.startswith(f".up.tmp-{p.pid}-")] and len(left) == 1
    assert not out.exists()
    rc, err = upstack_process("upscale", model_dir, out, "--m", 1)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if "removed" in ln]
    assert len(lines) == 1 and left[0] in lines[0] and f"process {p.pid}" in lines[0], err
    assert temp_siblings(out) == [] and (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_sigterm_during_a_write_exits_143_and_leaves_nothing(model_dir, tmp_path):
    out = tmp_path / "up"
    p, _ = start(tmp_path, "write", "SIGTERM", "upscale", model_dir, out, "--m", 1)
    rc, err = finish(p)
    assert rc == 143 and "terminated" in err, err
    assert not out.exists() and temp_siblings(out) == []


@pytest.mark.slow
def test_sigterm_during_training_saves_a_checkpoint_and_exits_143(model_dir, tmp_path):
    args, data, out, work = sft_command(model_dir, tmp_path, 4, 0)
    p, _ = start(tmp_path, "step:2", "SIGTERM", *args)
    rc, err = finish(p)
    assert rc == 143, err
    assert (work / "checkpoint-2").is_dir() and not out.exists() and temp_siblings(out) == []
    (work / "checkpoint-3.tmp").mkdir()          # as a SIGKILL mid-save leaves it
    rc, err = upstack_process(*args, "--resume")
    assert rc == 0 and "checkpoint-3.tmp" in err, err
    assert not work.exists() and (out / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# Case 11: a full disk

def _half_save_then_enospc(self, folder, *a, **k):
    """A save that writes part of its output, then finds the disk full."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 1000)
    raise OSError(errno.ENOSPC, "No space left on device")


def _sft_on_a_full_disk(model_dir, tmp_path, monkeypatch, cls, method, save_steps):
    """`upstack sft` with cls.method failing ENOSPC: (exit code, stderr, OUT, OUT.work); one error line."""
    monkeypatch.setattr(cls, method, _half_save_then_enospc)
    args, _, out, work = sft_command(model_dir, tmp_path, 4, save_steps)
    rc, err = cli(*args)
    monkeypatch.undo()
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err, out, work


def test_disk_full_during_a_resumable_checkpoint(model_dir, tmp_path, monkeypatch):
    from accelerate import Accelerator

    err, out, work = _sft_on_a_full_disk(model_dir, tmp_path, monkeypatch, Accelerator, "save_state", 2)
    assert "disk full while writing" in err and "checkpoint-2" in err and re.search(r"about [\d.]+ [KMG]B needed", err)
    assert not list(work.glob("checkpoint-*")) and not out.exists()


def test_disk_full_during_the_final_save(model_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    err, out, _ = _sft_on_a_full_disk(model_dir, tmp_path, monkeypatch, PreTrainedModel, "save_pretrained", 0)
    assert f"disk full while writing {out}" in err and re.search(r"about [\d.]+ [KMG]B needed", err)
    assert not out.exists() and temp_siblings(out) == []


def test_recipe_disk_check_counts_checkpoints_and_token_files(tmp_path, monkeypatch):
    from upstack.pipeline import load_recipe, plan_recipe, run_recipe
    from upstack.pipeline import run as pipeline_run
    from upstack.pipeline.plan import checkpoint_bytes, disk_need

    recipe = load_recipe("tiny-solar", tmp_path / "run", profile="quick")
    rows = {r["stage"]: r for r in plan_recipe(recipe)}
    p = rows["upscale"]["num_parameters"]
    sft = recipe.stages["sft_math"].resolved
    copies = sft.get("save_total_limit", 2) + 1 if sft.get("save_steps", 500) else 1
    assert rows["sft_math"]["work_bytes"] == checkpoint_bytes(p, sft) == p * 12 * copies
    assert disk_need(rows["sft_math"]) == rows["sft_math"]["disk_bytes"] + p * 12 * copies
    assert checkpoint_bytes(10, {"save_total_limit": 3, "save_steps": 5, "dtype": "bf16"}) == 10 * 10 * 4
    assert checkpoint_bytes(10, {"save_steps": 0, "lora": True}) == 10 * 4

    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"x" * 3000)
    model = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2, vocab_size=256)
    r = tmp_path / "r.yaml"
    r.write_text(f"stages:\n  pt:\n    type: pretrain\n    model: {model}\n    data: [{corpus}]\n"
                 "    save_steps: 0\n")
    run_dir = tmp_path / "run2"
    loaded = load_recipe(r, run_dir)
    est = {row["stage"]: row for row in plan_recipe(loaded)}["pt"]
    n = est["num_parameters"]
    assert n >= sum(t.numel() for t in weights(model).values()) > 0
    assert est["work_bytes"] == n * 12 + 3000 // 3 * 2
    need = disk_need(est)
    monkeypatch.setattr(pipeline_run.shutil, "disk_usage",
                        lambda p: type("U", (), {"free": int(est["disk_bytes"] * 1.2)})())
    with pytest.raises(Exception, match="checkpoints") as e:
        run_recipe(loaded, quiet=True, log=lambda m: None)
    assert f"{need / 1e9:.2f} GB" in str(e.value)


# ------------------------------------------------------------------------------------------------
# Case 7 (pretraining): a very long document

def test_long_documents_are_tokenized_piecewise_with_the_same_ids(model_dir, tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    from upstack.data.loading import parse_data_spec
    from upstack.train.pretrain import (
        document_ids,
        split_long_document,
        tokenize_to_file,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = tok.eos_token_id
    normal = "A normal document, with words.\nAnd a second line."
    assert document_ids(tok, normal, eos) == tok(normal)["input_ids"] + [eos]
    long = " ".join(f"word{i} and\tmore{i}\nline" for i in range(300))
    pieces = split_long_document(long, 100)
    assert "".join(pieces) == long and len(pieces) > 50 and all(len(x) <= 100 for x in pieces)
    assert document_ids(tok, long, eos, max_chars=100) == tok(long)["input_ids"] + [eos]
    assert split_long_document("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]

    (tmp_path / "c.txt").write_text(f"{normal}\n\n{long}\n\nlast one\n")
    meta = tokenize_to_file([parse_data_spec(str(tmp_path / "c.txt"))], tok, tmp_path / "t.bin", seed=0,
                            skip_bad_rows=False, progress=False, max_chars=100)
    want = []
    for doc in (normal, long, "last one"):
        want += tok(doc)["input_ids"] + [eos]
    assert np.fromfile(tmp_path / "t.bin", dtype=meta["dtype"]).tolist() == want and meta["documents"] == 3


# The peak is read from /proc/self/status (VmHWM): getrusage's ru_maxrss survives exec, so a subprocess of
# a big pytest process started with the parent's peak, and this test saw no growth at all.
_PEAK_RSS = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
from upstack.data.loading import parse_data_spec
from upstack.train.pretrain import tokenize_to_file

def peak_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM:")).split()[1])

tok = AutoTokenizer.from_pretrained(sys.argv[1])
text = Path(sys.argv[2])
tok("warm up " * 100)
before = peak_kb()
meta = tokenize_to_file([parse_data_spec(str(text))], tok, text.with_suffix(".bin"), seed=0, skip_bad_rows=False,
                        progress=False)
print((peak_kb() - before) // 1024, meta["tokens"])
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from /proc (Linux)")
def test_a_6mb_single_line_document_stays_within_a_memory_bound(model_dir, tmp_path):
    text = tmp_path / "one.txt"
    line = " ".join(f"token{i % 997} value{i % 13}" for i in range(400_000))[:6_000_000]
    text.write_text(line + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(model_dir), str(text)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    grown_mb, tokens = map(int, p.stdout.split())
    assert tokens > 1_000_000
    assert grown_mb < 400, f"peak RSS grew by {grown_mb} MB"
