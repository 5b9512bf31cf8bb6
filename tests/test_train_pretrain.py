"""upstack pretrain: streamed token files, document-isolated packing, eval perplexity, layer freezing."""

import json
import math

import pytest
from tiny import CORPUS, build_tiny_model

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_hidden_layers=2, vocab_size=256)


def pt_cfg(model_dir, tmp_path, data, **kw):
    from upstack.train.pretrain import PretrainConfig

    base = dict(model=str(model_dir), data=data, out=str(tmp_path / "out"), max_steps=2, batch_size=2,
                max_length=32, logging_steps=1, progress=False, tensorboard=False, save_steps=0)
    base.update(kw)
    return PretrainConfig(**base)


def test_token_file_streams_documents_with_eos_between(model_dir, tmp_path):
    import numpy as np
    from transformers import AutoTokenizer

    from upstack.data.loading import parse_data_spec
    from upstack.train.pretrain import tokenize_to_file

    tok = AutoTokenizer.from_pretrained(model_dir)
    (tmp_path / "a.txt").write_text("First doc here.\n\nSecond doc, two lines\nstill second.\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Third."}) + "\n")
    specs = [parse_data_spec(str(tmp_path / "a.txt")), parse_data_spec(str(tmp_path / "b.jsonl"))]
    meta = tokenize_to_file(specs, tok, tmp_path / "t.bin", seed=0, skip_bad_rows=False, progress=False,
                            batch_docs=1)
    want = []
    for doc in ["First doc here.", "Second doc, two lines\nstill second.", "Third."]:
        want += tok(doc)["input_ids"] + [tok.eos_token_id]
    got = np.fromfile(tmp_path / "t.bin", dtype=meta["dtype"])
    assert got.tolist() == want and meta["documents"] == 3 and meta["tokens"] == len(want)
    assert json.loads((tmp_path / "t.bin.json").read_text())["eos"] == tok.eos_token_id


def test_documents_in_a_block_do_not_attend_to_each_other(model_dir):
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upstack.lm import collate_segments, forward_logits
    from upstack.train.pretrain import block_segments

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    eos = tok.eos_token_id
    a = tok("The quick brown fox.")["input_ids"] + [eos]
    b = tok("Depth up-scaling stacks layers.")["input_ids"] + [eos]
    block = np.asarray(a + b, dtype=np.int64)
    segs = block_segments(block, eos)
    assert [len(s[0]) for s in segs] == [len(a), len(b)]
    with torch.no_grad():
        packed = collate_segments([segs], pad_id=3, reset_positions=True)
        got = forward_logits(model, packed)[0, len(a):]
        want = forward_logits(model, collate_segments([[segs[1]]], 3, True))[0]
    assert torch.allclose(got, want, atol=1e-5)
    assert packed["position_ids"][0].tolist() == list(range(len(a))) + list(range(len(b)))
    labels = packed["labels"][0].tolist()
    assert labels[len(a) - 1] == -100           # eos of a does not predict b's first token
    assert labels[len(a) - 2] == eos            # ... but a learns to end with eos


def test_overfits_and_reports_eval_perplexity(model_dir, tmp_path):
    from upstack.train.pretrain import pretrain

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(CORPUS[:4] * 6))
    summary = pretrain(pt_cfg(model_dir, tmp_path, [str(corpus)], max_steps=40, batch_size=4, learning_rate=3e-3,
                              lr_scheduler="constant", eval_fraction=0.2, eval_steps=20))
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert train[-1]["loss"] < 0.4 * train[0]["loss"]
    assert [e["step"] for e in evals] == [20, 40]
    assert summary["eval_perplexity"] == pytest.approx(math.exp(summary["eval_loss"]))
    assert summary["eval_blocks"] >= 1 and summary["document_masking"] is True
    assert summary["eval_loss"] < evals[0]["eval_loss"] + 1e-6 or summary["eval_loss"] < 3.0


def test_weighted_sources_and_eval_data(model_dir, tmp_path):
    from upstack.train.pretrain import pretrain

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS[:8]))
    (tmp_path / "b.txt").write_text("\n".join(CORPUS[:8]))
    (tmp_path / "e.txt").write_text("\n".join(CORPUS[4:8] * 2))
    summary = pretrain(pt_cfg(model_dir, tmp_path, [f"{tmp_path / 'a.jsonl'}:weight=1",
                                                    f"{tmp_path / 'b.txt'}:weight=2"],
                              eval_data=[str(tmp_path / "e.txt")], eval_fraction=0.0))
    assert summary["eval_blocks"] >= 1 and math.isfinite(summary["eval_loss"])
    used = {s["spec"].split("/")[-1].split(":")[0]: s["used"] for s in summary["data"]["sources"]}
    assert used["a.jsonl"] > 0 and used["b.txt"] > 0


def test_eval_on_start_scores_the_starting_model_at_step_0(model_dir, tmp_path):
    """`eval_on_start` adds an eval record at step 0 (the starting model's held-out loss) and changes
    nothing else: training and the final eval are those of a run without it."""
    from upstack.train.pretrain import pretrain

    (tmp_path / "c.txt").write_text("\n".join(CORPUS[:8] * 3))
    (tmp_path / "e.txt").write_text("\n".join(CORPUS[4:8] * 2))

    def run(name, model, **kw):
        summary = pretrain(pt_cfg(model, tmp_path, [str(tmp_path / "c.txt")], out=str(tmp_path / name),
                                  eval_data=[str(tmp_path / "e.txt")], eval_fraction=0.0, learning_rate=3e-3, **kw))
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return summary, [r for r in rows if r["type"] == "eval"]

    a, a_evals = run("a", model_dir, eval_on_start=True)
    assert [e["step"] for e in a_evals] == [0, 2]
    assert a_evals[0]["eval_loss"] != a_evals[1]["eval_loss"]
    b, b_evals = run("b", model_dir)
    assert [e["step"] for e in b_evals] == [2]
    assert b["final_loss"] == a["final_loss"] and b["eval_loss"] == a["eval_loss"]
    # step 0 of a run that starts from a's output is a's final held-out loss
    _, d_evals = run("d", str(tmp_path / "a"), eval_on_start=True, max_steps=1)
    assert d_evals[0]["step"] == 0 and d_evals[0]["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)


def test_train_layers_new_trains_only_the_added_blocks(tmp_path):
    from transformers import AutoModelForCausalLM

    from upstack.train.layers import freeze_for_training
    from upstack.train.model import prepare_model
    from upstack.train.pretrain import pretrain
    from upstack.train.run import start_run

    m = build_tiny_model(tmp_path / "up", "llama", num_hidden_layers=3, vocab_size=256)
    (m / "upstack.json").write_text(json.dumps({"upscale": {"method": "interleave", "layer_map": [0, 1, 1],
                                                            "new_layers": [2], "source": "x"}}))
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(CORPUS[:8]))
    cfg = pt_cfg(m, tmp_path, [str(corpus)], train_layers="new", learning_rate=1e-2, max_steps=2)
    pretrain(cfg)
    before = AutoModelForCausalLM.from_pretrained(m).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.2.") for k in changed)
    assert json.loads((tmp_path / "out" / "upstack.json").read_text())["upscale"]["new_layers"] == [2]
    # Frozen parameters get no optimizer state.
    cfg2 = pt_cfg(m, tmp_path, [str(corpus)], train_layers="0,2", out=str(tmp_path / "o2"))
    with start_run(cfg2, "pretrain") as run:
        model = AutoModelForCausalLM.from_pretrained(m)
        info = freeze_for_training(model, cfg2.train_layers, str(m))
        model, opt = prepare_model(run, model)
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in in_opt}
        assert names and all(n.startswith(("model.layers.0.", "model.layers.2.")) for n in names)
        assert info["train_layers"] == [0, 2] and info["trainable"] < info["total"]


def test_corpus_smaller_than_a_block_is_a_clear_error(model_dir, tmp_path):
    from upstack.errors import DataError
    from upstack.train.pretrain import pretrain

    (tmp_path / "c.txt").write_text("Tiny.")
    with pytest.raises(DataError, match="less than one block"):
        pretrain(pt_cfg(model_dir, tmp_path, [str(tmp_path / "c.txt")], max_length=64))
    assert not (tmp_path / "out").exists()


def test_real_text_samples(tmp_path, shared_data):
    from upstack.train.pretrain import pretrain

    # vocab 260: the tiny byte-level tokenizer has 256 byte tokens + 4 specials, and real text has non-ASCII.
    m = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2, vocab_size=260)
    summary = pretrain(pt_cfg(m, tmp_path, [f"{shared_data / 'c4' / 'c4_demo.jsonl'}:samples=5",
                                                    f"{shared_data / 'tinyshakespeare' / 'input.txt'}:samples=20"],
                              max_steps=1, max_length=64, eval_fraction=0.1))
    assert summary["documents"] == 25 and math.isfinite(summary["eval_loss"])


def test_lr_schedule_warmup_then_cosine_to_the_floor():
    from upstack.train.pretrain import PretrainConfig
    from upstack.train.schedule import lr_at

    cfg = PretrainConfig(model="m", data=["x"], out="o", learning_rate=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s, 20) for s in range(20)]
    assert lrs[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    cfg.lr_scheduler = "constant"
    assert lr_at(cfg, 10, 20) == 1.0


def test_precisions_checkpointing_and_epochs(model_dir, tmp_path):
    from upstack.checkpoint import open_checkpoint
    from upstack.train.pretrain import pretrain

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(CORPUS[:8]))
    runs = {}
    for name, kw in {"fp32": {}, "ckpt": {"gradient_checkpointing": True}, "mixed": {"dtype": "bf16-mixed"},
                     "bf16": {"dtype": "bf16", "save_dtype": "bf16"}}.items():
        runs[name] = pretrain(pt_cfg(model_dir, tmp_path, [str(corpus)], out=str(tmp_path / name),
                                     eval_fraction=0.0, max_steps=None, epochs=2, **kw))
    blocks = runs["fp32"]["blocks"]
    assert runs["fp32"]["steps"] == math.ceil(2 * blocks / 2)       # --epochs 2 at batch 2
    assert runs["ckpt"]["final_loss"] == pytest.approx(runs["fp32"]["final_loss"], rel=1e-5)
    assert abs(runs["mixed"]["final_loss"] - runs["fp32"]["final_loss"]) < 0.05
    assert math.isfinite(runs["bf16"]["final_loss"])
    assert set(open_checkpoint(tmp_path / "mixed").dtypes) == {"F32"}   # the input's dtype by default
    assert set(open_checkpoint(tmp_path / "bf16").dtypes) == {"BF16"}   # --save-dtype


def test_eval_on_start_and_tokens_seen_in_eval_records(model_dir, tmp_path):
    """`eval_on_start` scores the starting model at step 0 (tokens 0); every eval record carries the training
    tokens seen so far, the x axis of the report's held-out curve by tokens."""
    from upstack.train.pretrain import pretrain

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(CORPUS[:4] * 6))
    pretrain(pt_cfg(model_dir, tmp_path, [str(corpus)], max_steps=4, eval_fraction=0.2, eval_steps=2,
                    eval_on_start=True))
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    train = {r["step"]: r["tokens"] for r in records if r["type"] == "train"}
    assert [e["step"] for e in evals] == [0, 2, 4]
    assert [e["tokens"] for e in evals] == [0, train[2], train[4]] and train[4] == 4 * 2 * 32
    # the step-0 point is the starting model, before any update
    assert evals[0]["eval_loss"] > evals[-1]["eval_loss"]
