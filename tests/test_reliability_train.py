"""Reliability, round 3 (issue 22 items 11-15, issue 23's disk-check claims): resumes with a bad RNG file,
a model folder that is no checkpoint in a recipe, LoRA ranks beyond a layer's size, merge-adapter stages in
the recipe disk check, very long pretraining lines, blank-line bombs, and the disk-check estimates."""

import gzip
import json
import logging
import os
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


# ------------------------------------------------------------------------------------------------
# Item 12: a recipe stage whose model is `/`; a LoRA rank larger than a layer

def test_a_stage_whose_model_is_the_root_folder_is_one_line_at_once(tmp_path):
    """Before: the fingerprint read every file under / (27 s) and ended in an OSError traceback."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n\nmore text\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"stages:\n  pt:\n    type: pretrain\n    model: /\n    data: [{corpus}]\n")
    started = time.monotonic()
    rc, err = cli("run", recipe, "--out", tmp_path / "run")
    seconds = time.monotonic() - started
    line = one_error_line(err)
    assert rc == 2 and "model /" in line and "no config.json" in line and "'pt'" in line, line
    assert seconds < 10, f"{seconds:.1f} s"


def test_lora_rank_beyond_a_layer_is_one_line_in_the_dry_run_and_the_run(model_dir, tmp_path):
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    base = ["sft", model_dir, "--data", data, "--out", out, "--lora", "--max-steps", 1, "--batch-size", 2,
            "--max-length", 32, "--no-tensorboard"]
    # the tiny llama: hidden 64, k_proj/v_proj 64 -> 32 (2 kv heads of 16): r <= 32 for all-linear
    for extra in (["--dry-run"], []):
        rc, err = cli(*base, "--lora-r", 99999999999, *extra)
        line = one_error_line(err)
        assert rc == 2 and "lora_r: 99999999999" in line and "k_proj maps 64 -> 32, so r <= 32" in line, line
        rc, err = cli(*base, "--lora-r", 33, *extra)
        assert rc == 2 and "r <= 32" in one_error_line(err)
    assert not out.exists() and not (tmp_path / "out.work").exists()
    rc, err = cli(*base, "--lora-r", 64, "--lora-targets", "q_proj", "--dry-run")  # q_proj: 64 -> 64
    assert rc == 0, err
    rc, err = cli(*base, "--lora-r", 32, "--adapter-only")
    assert rc == 0, err


# ------------------------------------------------------------------------------------------------
# Item 13 and issue 23: the recipe disk check (merge-adapter stages; an estimator's bug shows)

@pytest.fixture(scope="module")
def adapter_dir(model_dir, tmp_path_factory):
    """A PEFT LoRA adapter (r=2 on q_proj) of the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("adapter") / "lora"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


def _merge_adapter_recipe(tmp_path, model_dir, adapter_dir, dtype=None):
    from upstack.pipeline import load_recipe

    tmp_path.mkdir(exist_ok=True)
    r = tmp_path / "r.yaml"
    r.write_text(f"stages:\n  merged:\n    type: merge-adapter\n    base: {model_dir}\n    adapter: {adapter_dir}\n"
                 + (f"    dtype: {dtype}\n" if dtype else ""))
    return load_recipe(r, tmp_path / "run")


def test_recipe_disk_check_counts_merge_adapter_stages(model_dir, adapter_dir, tmp_path, monkeypatch):
    from upstack.errors import UpstackError
    from upstack.pipeline import plan_recipe, run_recipe
    from upstack.pipeline import run as pipeline_run

    recipe = _merge_adapter_recipe(tmp_path, model_dir, adapter_dir)
    row = {r["stage"]: r for r in plan_recipe(recipe)}["merged"]
    weights_bytes = (model_dir / "model.safetensors").stat().st_size
    assert row["disk_bytes"] == weights_bytes, row  # the merged model: the base's tensors
    n = sum(t.numel() for t in weights(model_dir).values())
    assert row["num_parameters"] >= n
    bf16 = {r["stage"]: r for r in plan_recipe(_merge_adapter_recipe(tmp_path / "b", model_dir, adapter_dir,
                                                                     "bfloat16"))}["merged"]
    assert bf16["disk_bytes"] == bf16["num_parameters"] * 2

    monkeypatch.setattr(pipeline_run.shutil, "disk_usage", lambda p: type("U", (), {"free": weights_bytes // 2})())
    with pytest.raises(UpstackError, match="stage 'merged': needs about"):
        run_recipe(recipe, quiet=True, log=lambda m: None)
    assert not (tmp_path / "run" / "merged").exists()


def test_disk_estimate_lets_a_bug_show_and_skips_an_expected_problem(model_dir, adapter_dir, tmp_path,
                                                                    monkeypatch):
    from upstack.errors import ConfigError
    from upstack.pipeline import plan
    from upstack.pipeline import run as pipeline_run

    recipe = _merge_adapter_recipe(tmp_path, model_dir, adapter_dir)
    st = recipe.stages["merged"]

    def bug(*_):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'NoneType'")

    def unreadable(*_):
        raise PermissionError(13, "Permission denied", str(model_dir / "config.json"))

    def mistake(*_):
        raise ConfigError("lora_r: 99 is more than the adapted layers allow")

    monkeypatch.setitem(plan.ESTIMATORS, "merge-adapter", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        pipeline_run._disk_estimate(st, recipe, {})
    for expected in (unreadable, mistake):  # the stage reports these itself when it runs
        monkeypatch.setitem(plan.ESTIMATORS, "merge-adapter", expected)
        assert pipeline_run._disk_estimate(st, recipe, {}) == {}


# ------------------------------------------------------------------------------------------------
# Issue 23: the final save's disk check counts a QLoRA base's 4-bit weights unpacked

@pytest.mark.slow
def test_final_save_disk_check_counts_qlora_weights_unpacked(model_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    import upstack.train.checkpointing as checkpointing

    asked = []
    real = checkpointing.atomic_output_dir

    def recording(out, *a, need_bytes=None, **k):
        asked.append(need_bytes)
        return real(out, *a, need_bytes=need_bytes, **k)

    monkeypatch.setattr(checkpointing, "atomic_output_dir", recording)
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Q{i}", "output": f"A{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    rc, err = cli("sft", model_dir, "--data", data, "--out", out, "--qlora", "--dtype", "bf16", "--lora-r", 2,
                  "--max-steps", 1, "--batch-size", 2, "--max-length", 32, "--no-tensorboard")
    assert rc == 0, err
    saved = sum(t.numel() * t.element_size() for t in weights(out).values())  # the merged model, float32
    n_base = sum(t.numel() for t in weights(model_dir).values())
    adapter_params = sum(t.numel() for t in adapter(out).values())
    assert asked == [(n_base + adapter_params) * 4] and asked[0] >= saved, (asked, saved)


# ------------------------------------------------------------------------------------------------
# Item 14: a very long line of pretraining text

# The peak is read from /proc/self/status (VmHWM): getrusage's ru_maxrss survives exec, so a subprocess of
# a big pytest process starts with the parent's peak and shows no growth at all.
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
tok("w1 w2 " * 100)
before = peak_kb()
meta = tokenize_to_file([parse_data_spec(str(text))], tok, text.with_suffix(".bin"), seed=0, skip_bad_rows=False,
                        progress=False)
print((peak_kb() - before) // 1024, meta["tokens"], meta["documents"])
"""


def word_tokenizer(folder):
    """A word-level tokenizer of 4,000 words w0..w3999 (ids 4..4003: like a real vocabulary's, not the small
    ints Python caches), saved to `folder`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": 4 + i for i in range(4000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from /proc (Linux)")
def test_a_30mb_line_is_tokenized_in_bounded_memory_with_the_same_ids(tmp_path):
    import numpy as np
    from tiny import build_tiny_tokenizer

    from upstack.data.loading import parse_data_spec
    from upstack.train.pretrain import MAX_PIECE_CHARS, tokenize_to_file

    # the same ids as tokenizing in one go (a byte-level BPE with merges, a line of 3.5 pieces)
    tok = build_tiny_tokenizer(tmp_path / "bpe", vocab_size=1000)
    words = "The quick brown fox jumps over the lazy dog. Depth up-scaling stacks two copies of a model."
    line = (words + " ") * (int(3.5 * MAX_PIECE_CHARS) // (len(words) + 1))
    (tmp_path / "small.txt").write_text(f"first document\n\n{line}\n\nlast\n")
    meta = tokenize_to_file([parse_data_spec(str(tmp_path / "small.txt"))], tok, tmp_path / "small.bin", seed=0,
                            skip_bad_rows=False, progress=False)
    want = [i for doc in ("first document", line.strip(), "last") for i in tok(doc)["input_ids"] + [tok.eos_token_id]]
    assert np.fromfile(tmp_path / "small.bin", dtype=meta["dtype"]).tolist() == want and meta["documents"] == 3

    # a 30 MB line: before, all its ids went into one Python list (325 MB more at the peak; 3.7 GB for 200 MB)
    vocab = word_tokenizer(tmp_path / "words")
    text = tmp_path / "one.txt"
    text.write_text(" ".join(f"w{(i * 7919) % 4000}" for i in range(6_000_000))[:30_000_000] + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run([sys.executable, "-c", _PEAK_RSS, str(vocab), str(text)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    grown_mb, tokens, documents = map(int, p.stdout.split())
    assert tokens > 5_000_000 and documents == 1
    # measured: 108 MB (the line's bytes and its text, read once; one piece's ids at a time)
    assert grown_mb < 200, f"peak RSS grew by {grown_mb} MB for a 30 MB line"


# ------------------------------------------------------------------------------------------------
# Item 15: disk-full sizes that read the same; a gzip of blank lines

def test_disk_full_message_shows_sizes_that_differ(tmp_path, monkeypatch):
    import upstack.outputs as outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: type("U", (), {"free": 12_301_000})())
    msg = str(outputs.disk_full_error(tmp_path / "out", 12_345_678))
    assert "about 12.35 MB needed; 12.30 MB free in" in msg, msg
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: type("U", (), {"free": 7_250_000_000})())
    msg = str(outputs.disk_full_error(tmp_path / "out", 450_000))
    assert "about 450.00 KB needed; 7.25 GB free in" in msg, msg
    assert outputs.format_sizes(1_000_000_500, 1_000_000_000) == ["1.000001 GB", "1.000000 GB"]


def _read_seconds(path, read):
    started = time.monotonic()
    with pytest.raises(Exception, match="no usable"):
        read(path)
    return time.monotonic() - started


def test_a_gzip_of_a_hundred_million_blank_lines_reads_in_seconds(tmp_path):
    """100 MB of newlines, 100 KB gzipped (a 1 MB gzip holds ten times more): before, half a microsecond of
    Python per blank line (50 s here; 9 minutes for the 1 MB gzip); now a scan of each read buffer."""
    from upstack.data.loading import iter_text_documents, load_sft_rows, parse_data_spec

    names = {"rows.jsonl.gz": lambda p: load_sft_rows([parse_data_spec(str(p))]),
             "text.txt.gz": lambda p: list(iter_text_documents([parse_data_spec(str(p))])),
             "rows.json.gz": lambda p: load_sft_rows([parse_data_spec(str(p))])}
    for name, read in names.items():
        path = tmp_path / name
        with gzip.open(path, "wb") as f:
            f.write(b"[" if name.endswith(".json.gz") else b"")
            for _ in range(100):
                f.write(b"\n" * 1_000_000)
            f.write(b"]" if name.endswith(".json.gz") else b"")
        assert path.stat().st_size < 200_000
        started = time.monotonic()
        with gzip.open(path, "rb") as f:
            while f.read(1 << 20):
                pass
        inflate = time.monotonic() - started  # the machine's speed: inflating the file alone
        seconds = _read_seconds(path, read)
        assert seconds < 2 + 8 * inflate, f"{name}: {seconds:.1f} s (inflating it alone: {inflate:.1f} s)"


def test_blank_lines_keep_their_line_numbers_and_end_paragraphs(tmp_path):
    from upstack.data.files import iter_txt, numbered_lines

    data = b"\n \t\n{\"a\": 1}\n\x0c\r\n\nx \r\n" + b"\n" * 70_000 + b"  two\nlines\n   \n" + b" " * 9000 + b"end"
    (tmp_path / "t.txt").write_bytes(data)
    with open(tmp_path / "t.txt", "rb") as fh:
        got = list(numbered_lines(fh))
    want = [(n, line) for n, line in enumerate(data.split(b"\n"), 1) if line.strip()]
    assert [(n, line.rstrip(b"\n")) for n, line in got] == want
    assert list(iter_txt(tmp_path / "t.txt", "paragraph")) == [
        (3, '{"a": 1}', None), (6, "x", None), (70_007, "two\nlines", None), (70_010, "end", None)]
    assert [n for n, _, _ in iter_txt(tmp_path / "t.txt", "line")] == [3, 6, 70_007, 70_008, 70_010]
