"""upstack sft: response-only labels, templates, packing isolation, overfitting, outputs, bad input."""

import importlib.util
import json
import math
import os

import pytest
from tiny import build_tiny_model

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_hidden_layers=2, vocab_size=256)


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QA = [("What is two plus two?", "Four."), ("Name a color.", "Blue is a color."),
      ("Say hello.", "Hello there, friend."), ("Count to three.", "One, two, three.")]


def alpaca_rows(n=4):
    return [{"instruction": QA[i % len(QA)][0], "input": "", "output": QA[i % len(QA)][1]} for i in range(n)]


def sft_cfg(model_dir, tmp_path, data, **kw):
    from upstack.train.sft import SFTConfig

    base = dict(model=str(model_dir), data=data, out=str(tmp_path / "out"), max_steps=2, batch_size=2,
                max_length=64, logging_steps=1, progress=False, tensorboard=False, save_steps=0)
    base.update(kw)
    return SFTConfig(**base)


def labelled_targets(batch, row):
    """Token ids the model is asked to produce in `row` (labels are shifted: position t predicts t+1)."""
    labels = batch["labels"][row]
    return [int(x) for x in labels[labels != -100]]


# ------------------------------------------------------------------------------------------------
# Response-only loss, token by token

def pieces_ids(tok, pieces):
    """Expected ids and label flags built independently: tokenize each piece on its own."""
    ids, flags = [], []
    for text, is_response in pieces:
        t = tok(text, add_special_tokens=False)["input_ids"]
        ids += t
        flags += [is_response] * len(t)
    return ids, flags


def test_multi_turn_labels_are_exactly_the_assistant_tokens(tok):
    from upstack.data.chat import encode_sft_rows
    from upstack.lm import collate_segments

    msgs = [{"role": "user", "content": "Hi fox."}, {"role": "assistant", "content": "Hello dog."},
            {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "The quick end."}]
    enc, keep = encode_sft_rows(tok, [{"messages": msgs}], max_length=500)
    ids, mask = enc.get(0)
    # The template renders "<s>ROLE\nTEXT</s>\n" per turn: only "TEXT</s>" of assistant turns is the response.
    want_ids, want_flags = pieces_ids(tok, [
        ("<s>user\nHi fox.</s>\n<s>assistant\n", False), ("Hello dog.</s>", True),
        ("\n<s>user\nAnd then?</s>\n<s>assistant\n", False), ("The quick end.</s>", True), ("\n", False)])
    assert list(ids) == want_ids
    assert list(mask) == want_flags
    batch = collate_segments([[enc.get(0)]], pad_id=3, reset_positions=False)
    expected = [want_ids[t + 1] for t in range(len(want_ids) - 1) if want_flags[t + 1]]
    assert labelled_targets(batch, 0) == expected
    for t in range(len(want_ids) - 1):  # position by position
        assert (int(batch["labels"][0, t]) != -100) == want_flags[t + 1]
    assert tok.decode(expected) == "Hello dog.</s>The quick end.</s>"
    assert keep == [0] and enc.stats["truncated"] == 0


def test_truncation_cuts_the_response_and_is_counted(tok):
    from upstack.data.chat import encode_sft_rows

    msgs = [{"role": "user", "content": "Hi fox."}, {"role": "assistant", "content": "Hello dog, how are you?"}]
    prompt_ids, _ = pieces_ids(tok, [("<s>user\nHi fox.</s>\n<s>assistant\n", False)])
    cut = len(prompt_ids) + 4
    enc, keep = encode_sft_rows(tok, [{"messages": msgs}, {"messages": msgs}], max_length=cut)
    ids, mask = enc.get(0)
    assert len(ids) == cut
    assert list(mask) == [False] * len(prompt_ids) + [True] * 4   # the 4 response tokens that survived
    assert enc.stats["truncated"] == 2 and enc.stats["no_response"] == 0 and keep == [0, 1]
    # Cut inside the prompt: nothing left to learn, counted and dropped.
    enc, keep = encode_sft_rows(tok, [{"messages": msgs}], max_length=len(prompt_ids) - 2)
    assert keep == [] and enc.stats["no_response"] == 1 and enc.stats["truncated"] == 1


def test_alpaca_template_when_the_tokenizer_has_none(model_dir, tok):
    from transformers import AutoTokenizer

    from upstack.data.chat import render_with_spans, resolve_template

    t = AutoTokenizer.from_pretrained(model_dir)
    t.chat_template = None
    assert resolve_template(t, "auto", "m") == "alpaca"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
            {"role": "assistant", "content": "Hello."}]
    text, spans, exact = render_with_spans(t, msgs)
    assert text == "<s>### System:\nBe brief.\n\n### User:\nHi.\n\n### Assistant:\nHello.</s>\n\n"
    assert exact and [text[a:b] for a, b in spans] == ["Hello.</s>"]
    from upstack.errors import ConfigError

    bare = AutoTokenizer.from_pretrained(model_dir)
    bare.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        resolve_template(bare, "chat", "m")


# ------------------------------------------------------------------------------------------------
# Packing

def test_packed_examples_do_not_attend_to_each_other(model_dir, tok):
    from transformers import AutoModelForCausalLM

    from upstack.data.chat import encode_sft_rows
    from upstack.lm import collate_segments, forward_logits, supports_packed_positions

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert supports_packed_positions(model)
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in QA[:2]]
    enc, _ = encode_sft_rows(tok, rows, max_length=200)
    a, b = enc.get(0), enc.get(1)
    with torch.no_grad():
        packed = collate_segments([[a, b]], pad_id=3, reset_positions=True)
        alone = collate_segments([[b]], pad_id=3, reset_positions=True)
        got = forward_logits(model, packed)[0, len(a[0]):]
        want = forward_logits(model, alone)[0]
        assert torch.allclose(got, want, atol=1e-5)
        # Rounded up to a multiple of 64 (the CUDA default), the padding is one more segment: same logits.
        padded = collate_segments([[a, b]], pad_id=3, reset_positions=True, pad_to_multiple_of=64)
        assert padded["input_ids"].shape[1] % 64 == 0 and padded["input_ids"].shape[1] > len(a[0]) + len(b[0])
        got = forward_logits(model, padded)[0, len(a[0]):len(a[0]) + len(b[0])]
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.equal(padded["labels"][0, :len(a[0]) + len(b[0])], packed["labels"][0])
        assert bool((padded["labels"][0, len(a[0]) + len(b[0]):] == -100).all())
        # Control: without position restarts the second example does see the first.
        leaky = collate_segments([[a, b]], pad_id=3, reset_positions=False)
        assert not torch.allclose(forward_logits(model, leaky)[0, len(a[0]):], want, atol=1e-3)
    # No label crosses the boundary: the first token of b is not a target of a's last position.
    assert int(packed["labels"][0, len(a[0]) - 1]) == -100


def test_packing_defaults_off_where_attention_cannot_be_reset(model_dir, tmp_path, monkeypatch):
    import upstack.train.sft as sft_mod

    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    summary = sft_mod.sft(sft_cfg(model_dir, tmp_path, [str(data)], max_steps=1))
    assert summary["packing"] is True
    monkeypatch.setattr(sft_mod, "supports_packed_positions", lambda model: False)
    summary = sft_mod.sft(sft_cfg(model_dir, tmp_path, [str(data)], max_steps=1, overwrite=True))
    assert summary["packing"] is False


def test_pack_examples_fills_rows_in_order():
    from upstack.train.sft import pack_examples

    assert pack_examples([0, 1, 2, 3], [5, 4, 3, 9], 10) == [[0, 1], [2], [3]]


# ------------------------------------------------------------------------------------------------
# Training

def test_overfits_a_small_batch_and_writes_a_standard_checkpoint(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upstack.train.sft import sft

    (model_dir / "upstack.json").write_text(json.dumps({"upscale": {"layer_map": [0, 1], "new_layers": []}}))
    try:
        data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
        summary = sft(sft_cfg(model_dir, tmp_path, [f"{data}:format=alpaca"], max_steps=40, batch_size=4,
                              learning_rate=3e-3, lr_scheduler="constant", packing=False, tensorboard=True,
                              eval_data=[str(data)]))
    finally:
        (model_dir / "upstack.json").unlink()
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert train[-1]["loss"] < 0.3 * train[0]["loss"]
    for key in ("loss", "lr", "tokens_per_s", "tokens", "grad_norm", "epoch", "elapsed_s"):
        assert key in train[0]
    assert records[-1]["type"] == "summary" and summary["steps"] == 40
    assert summary["eval_loss"] < 0.5 * train[0]["loss"] and "eval_perplexity" in summary
    # TensorBoard event files when tensorboard is installed (the [test] extra installs it), none otherwise.
    if importlib.util.find_spec("tensorboard") is not None:
        assert any((out / "tensorboard").iterdir())
    else:
        assert not (out / "tensorboard").exists()
    # A plain HF folder that transformers loads; upstack.json carried forward; no work folder left.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).chat_template
    assert json.loads((out / "upstack.json").read_text())["upscale"]["layer_map"] == [0, 1]
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert (out / "generation_config.json").is_file() and (out / "train_config.json").is_file()
    assert not (tmp_path / "out.work").exists()
    assert model.config.num_hidden_layers == 2


def test_recipe_mapping_fills_the_config(model_dir, tmp_path):
    from upstack.config import config_from_dict
    from upstack.train.sft import SFTConfig, sft

    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(6))
    cfg = config_from_dict(SFTConfig, {
        "model": str(model_dir), "data": [{"path": str(data), "format": "alpaca", "samples": 3}],
        "out": str(tmp_path / "out"), "max_steps": 1, "progress": False, "tensorboard": False,
        "train_layers": [1]})
    summary = sft(cfg)
    assert summary["train_rows"] == 3 and summary["steps"] == 1


def test_bf16_input_saved_as_bf16_and_missing_pad_token(tmp_path):
    from transformers import AutoTokenizer

    from upstack.train.sft import sft

    m = build_tiny_model(tmp_path / "bf", "llama", num_hidden_layers=2, vocab_size=256, dtype="bfloat16")
    t = AutoTokenizer.from_pretrained(m)
    t.pad_token = None
    t.save_pretrained(m)
    assert AutoTokenizer.from_pretrained(m).pad_token_id is None
    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    summary = sft(sft_cfg(m, tmp_path, [str(data)], packing=False))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and summary["save_dtype"] == "bfloat16"
    from upstack.checkpoint import open_checkpoint

    assert set(open_checkpoint(tmp_path / "out").dtypes) == {"BF16"}


# ------------------------------------------------------------------------------------------------
# Bad input, through the CLI

def cli(*args):
    from upstack.cli import main

    return main([str(args[0]), "-q", *map(str, args[1:])])


def test_bad_rows_name_file_row_and_field(model_dir, tmp_path, capsys):
    rows = alpaca_rows(4)
    rows[2] = {"instruction": "x", "input": "", "output": 7}
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    assert cli("sft", model_dir, "--data", f"{data}:format=alpaca", "--out", out, "--max-steps", 1) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 3" in err and "output" in err
    assert not out.exists()
    assert cli("sft", model_dir, "--data", f"{data}:format=alpaca", "--out", out, "--max-steps", 1,
               "--skip-bad-rows", "--json", "--no-tensorboard") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_rows"] == 1 and summary["train_rows"] == 3


def test_empty_dataset_hub_id_offline_and_existing_output(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    out = tmp_path / "out"
    assert cli("sft", model_dir, "--data", f"{data}:filter=instruction=='nope'", "--out", out) == 2
    assert "no usable rows" in capsys.readouterr().err
    assert cli("sft", model_dir, "--data", "someorg/some-dataset", "--out", out) == 2
    assert "offline" in capsys.readouterr().err
    out.mkdir()
    assert cli("sft", model_dir, "--data", str(data), "--out", out) == 2
    assert "already exists" in capsys.readouterr().err


def test_bad_options_fail_before_work(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(4))
    assert cli("sft", model_dir, "--data", data, "--out", tmp_path / "o", "--train-layers", "0-9") == 2
    assert "out of range" in capsys.readouterr().err
    assert cli("sft", model_dir, "--data", data, "--out", tmp_path / "o", "--train-layers", "new") == 2
    assert "upstack.json" in capsys.readouterr().err
    assert cli("sft", model_dir, "--data", data, "--out", tmp_path / "o", "--lr", "-1") == 2
    assert "learning_rate" in capsys.readouterr().err
    assert cli("sft", tmp_path / "nomodel", "--data", data, "--out", tmp_path / "o") == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.work").exists()


def test_real_alpaca_sample_truncation_is_logged(model_dir, tmp_path, shared_data, caplog):
    import logging

    from upstack.train.sft import sft

    data = shared_data / "alpaca" / "alpaca_data_first200.jsonl"
    with caplog.at_level(logging.WARNING, logger="upstack.train"):
        summary = sft(sft_cfg(model_dir, tmp_path, [f"{data}:samples=16,seed=1"], max_length=128,
                              template="alpaca", max_steps=1))
    assert summary["truncated"] > 0 and summary["template"] == "alpaca"
    assert any("truncated" in r.message for r in caplog.records)
    assert math.isfinite(summary["final_loss"])
    assert "### Assistant:" in (tmp_path / "out" / "chat_template.jinja").read_text() or \
        "### Assistant:" in json.dumps(json.loads((tmp_path / "out" / "tokenizer_config.json").read_text()))
    assert os.path.isdir(tmp_path / "out")


def test_resume_with_overwrite_continues_or_starts_over(model_dir, tmp_path):
    """What a pipeline passes: --resume --overwrite continues a matching run, restarts a different one."""
    from upstack.train.sft import sft

    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(8))
    sft(sft_cfg(model_dir, tmp_path, [str(data)], max_steps=4, save_steps=2, keep_checkpoints=True))
    assert (tmp_path / "out.work" / "checkpoint-2").is_dir()

    def first_record():
        return json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])

    sft(sft_cfg(model_dir, tmp_path, [str(data)], max_steps=4, save_steps=2, resume=True, overwrite=True))
    assert first_record()["type"] == "start" and any(
        json.loads(x)["type"] == "resume" and json.loads(x)["step"] == 2
        for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines())
    sft(sft_cfg(model_dir, tmp_path, [str(data)], max_steps=4, save_steps=2, keep_checkpoints=True, overwrite=True))
    summary = sft(sft_cfg(model_dir, tmp_path, [str(data)], max_steps=4, save_steps=2, resume=True, overwrite=True,
                          learning_rate=1e-3))
    recs = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert not any(r["type"] == "resume" for r in recs) and summary["steps"] == 4


def test_pad_multiple_defaults_to_64_on_cuda_only():
    from types import SimpleNamespace

    from upstack.errors import ConfigError
    from upstack.train.config import TrainConfig, check_config
    from upstack.train.run import Run

    def run(device, **kw):
        return Run(cfg=TrainConfig(model="m", data=["x"], out="o", **kw), stage="sft",
                   accelerator=SimpleNamespace(device=SimpleNamespace(type=device)), out=None, work=None)

    assert run("cpu").pad_multiple == 1
    assert run("cuda").pad_multiple == 64
    assert run("cuda", pad_to_multiple_of=8).pad_multiple == 8
    assert run("cpu", pad_to_multiple_of=16).pad_multiple == 16
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        check_config(TrainConfig(model="m", data=["x"], out="o", pad_to_multiple_of=0))


def test_a_large_eval_fraction_keeps_one_training_example(model_dir, tmp_path):
    """--eval-fraction 0.9 of 2 rows once held out both (and crashed in the epoch order): one must train."""
    from upstack.train.sft import sft

    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(2))
    summary = sft(sft_cfg(model_dir, tmp_path, [str(data)], max_steps=1, batch_size=1, eval_fraction=0.9,
                          packing=False))
    assert summary["train_rows"] == 1 and summary["eval_rows"] == 1 and summary["steps"] == 1


def test_a_step_never_repeats_a_packed_row(model_dir, tmp_path, caplog):
    """16 short examples pack into a few rows: --batch-size 16 once used each packed row several times in
    one step (epoch 4.0). The batch is capped to the rows there are, and the log says so."""
    from upstack.train.sft import sft

    data = write_jsonl(tmp_path / "a.jsonl", alpaca_rows(16))
    out = tmp_path / "out"
    summary = sft(sft_cfg(model_dir, tmp_path, [str(data)], max_steps=1, batch_size=16, packing=True,
                          max_length=256))
    start = next(json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    rows = start["items"]
    assert rows < 16 and start["global_batch"] == rows and summary["steps"] == 1
    assert train[-1]["epoch"] == pytest.approx(1.0)
    assert f"--batch-size 16 capped to {rows}" in caplog.text
