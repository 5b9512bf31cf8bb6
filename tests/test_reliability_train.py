"""Reliability, round 3 (issue 22 items 11-15, issue 23's disk-check claims): resumes with a bad RNG file,
a model folder that is no checkpoint in a recipe, LoRA ranks beyond a layer's size, merge-adapter stages in
the recipe disk check, very long pretraining lines, blank-line bombs, and the disk-check estimates."""

import contextlib
import gzip
import io
import json
import logging
import os
import subprocess
import sys
import time

import pytest
from tiny import build_tiny_model

from upstack.cli import main

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_hidden_layers=2, vocab_size=256)


def cli(*args):
    """`upstack ARGS -q` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main([str(args[0]), "-q", *map(str, args[1:])])
    return rc, err.getvalue()


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Item 11: --resume with a missing or corrupt RNG state file

def _lora_run_with_a_checkpoint(model_dir, tmp_path):
    """A finished LoRA SFT run (dropout on: it draws random numbers every step) that kept its step-2
    checkpoint; OUT is moved aside as the uninterrupted result. (args, uninterrupted, OUT, checkpoint)."""
    rows = [{"instruction": f"Question {i}: what is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(12)]
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["sft", model_dir, "--data", data, "--out", out, "--max-steps", 4, "--save-steps", 2, "--batch-size", 2,
            "--max-length", 64, "--lr", "1e-2", "--no-tensorboard", "--no-packing", "--lora", "--lora-r", 4,
            "--lora-dropout", 0.3, "--keep-checkpoints", "--adapter-only"]
    rc, err = cli(*args)
    assert rc == 0, err
    whole = tmp_path / "uninterrupted"
    out.rename(whole)
    ckpt = tmp_path / "out.work" / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file()
    return args, whole, out, ckpt


def adapter(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_resume_with_a_missing_or_corrupt_rng_file_is_refused_naming_it(model_dir, tmp_path):
    args, whole, out, ckpt = _lora_run_with_a_checkpoint(model_dir, tmp_path)
    rng = ckpt / "random_states_0.pkl"
    good = rng.read_bytes()

    rc, err = cli(*args, "--resume")  # the RNG file intact: the resumed run ends where the whole run ended
    assert rc == 0, err
    a, b = adapter(out), adapter(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # (the checkpoint folder is kept by --keep-checkpoints; start the next resume from it again)
    for bad, why in ((None, "is missing"), (b"\x80\x02garbage" * 50, "truncated or corrupt"),
                     (good[: len(good) // 2], "truncated or corrupt")):
        out.rename(tmp_path / f"done-{time.monotonic_ns()}")
        rng.unlink(missing_ok=True)
        if bad is not None:
            rng.write_bytes(bad)
        rc, err = cli(*args, "--resume")
        line = one_error_line(err)
        assert rc == 2 and str(rng) in line and why in line and "--resume-ignore-rng" in line, line
        assert not out.exists() and (ckpt / "trainer_state.json").is_file()  # nothing lost, nothing written
        out.mkdir()  # renamed away at the top of the next round
    rng.write_bytes(good)


@pytest.mark.slow
def test_resume_ignore_rng_goes_on_and_says_the_run_will_differ(model_dir, tmp_path, caplog):
    args, whole, out, ckpt = _lora_run_with_a_checkpoint(model_dir, tmp_path)
    rng = ckpt / "random_states_0.pkl"
    rng.write_bytes(b"not a pickle at all")
    with caplog.at_level(logging.WARNING, logger="upstack.train"):
        rc, err = cli(*args, "--resume", "--resume-ignore-rng")
    assert rc == 0, err
    warned = [r.getMessage() for r in caplog.records if str(rng) in r.getMessage()]
    assert len(warned) == 1 and "--resume-ignore-rng" in warned[0] and "differ" in warned[0], warned
    assert "\n" not in warned[0]
    a, b = adapter(out), adapter(whole)  # other dropout masks after the resume: another result, as it says
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


def test_resume_ignore_rng_is_a_recipe_key_and_free_to_change_between_resumes():
    from upstack.train.run import RESUME_FREE
    from upstack.train.sft import SFTConfig

    from upstack.config import config_from_dict

    cfg = config_from_dict(SFTConfig, {"model": "m", "data": ["d.jsonl"], "out": "o", "resume_ignore_rng": True},
                           "stage 'sft'")
    assert cfg.resume_ignore_rng is True and "resume_ignore_rng" in RESUME_FREE
