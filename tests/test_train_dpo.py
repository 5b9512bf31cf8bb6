"""upstack dpo: loss formulas checked independently, log 2 at the start, rewards improve, reference modes."""

import json
import math

import pytest
from tiny import build_tiny_model

torch = pytest.importorskip("torch")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", num_hidden_layers=2, vocab_size=256)


PAIRS = [("What is two plus two?", "Four.", "Seven, obviously."),
         ("Name a color.", "Blue.", "A dog is a color."),
         ("Say hello.", "Hello there.", "No."),
         ("Count to three.", "One, two, three.", "Three, one.")]


def pair_file(tmp_path, n=8):
    rows = [{"prompt": PAIRS[i % 4][0], "chosen": PAIRS[i % 4][1], "rejected": PAIRS[i % 4][2]} for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_cfg(model_dir, tmp_path, data, **kw):
    from upstack.train.dpo import DPOConfig

    base = dict(model=str(model_dir), data=data, out=str(tmp_path / "out"), max_steps=1, batch_size=2,
                max_length=64, logging_steps=1, progress=False, tensorboard=False, save_steps=0)
    base.update(kw)
    return DPOConfig(**base)


def train_records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]


# ------------------------------------------------------------------------------------------------
# Formulas, against values computed here by hand

def _logsig(x):
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("loss_type,smooth", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0), ("ipo", 0.0)])
def test_loss_formulas(loss_type, smooth):
    from upstack.train.dpo import dpo_losses

    pc, pr, rc, rr = [-10.0, -3.5], [-12.0, -2.0], [-11.0, -3.0], [-11.5, -2.5]
    nc, nr = [4, 7], [5, 2]
    beta = 0.3
    got = dpo_losses(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta, loss_type=loss_type,
                     label_smoothing=smooth, chosen_tokens=torch.tensor(nc), rejected_tokens=torch.tensor(nr))
    for i in range(2):
        d = (pc[i] - rc[i]) - (pr[i] - rr[i])
        if loss_type == "sigmoid":
            want = -(1 - smooth) * _logsig(beta * d) - smooth * _logsig(-beta * d)
        elif loss_type == "hinge":
            want = max(0.0, 1 - beta * d)
        else:
            d = (pc[i] - rc[i]) / nc[i] - (pr[i] - rr[i]) / nr[i]
            want = (d - 1 / (2 * beta)) ** 2
        assert float(got[i]) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("multiple", [1, 64])
def test_batch_loss_matches_an_independent_computation(model_dir, multiple):
    """pair_loss on a padded batch == the DPO formula over log-probs summed token by token here, also
    with the width rounded up to a multiple (what CUDA runs do by default)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upstack.data.chat import encode_pairs
    from upstack.lm import collate_segments
    from upstack.train.dpo import pair_loss

    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS[:3]]
    enc, pairs, _ = encode_pairs(tok, rows, max_length=200)
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    batch = collate_segments([[enc.get(s)] for s in seqs], pad_id=3, reset_positions=False,
                             pad_to_multiple_of=multiple)
    width = max(len(enc.get(s)[0]) for s in seqs)
    assert batch["input_ids"].shape[1] == (64 if multiple == 64 else width)
    assert batch["n_tokens"] == sum(len(enc.get(s)[0]) for s in seqs)  # padding is never counted
    batch["n_loss"] = len(pairs)
    beta = 0.1
    with torch.no_grad():
        loss, stats = pair_loss(policy, batch, beta=beta, ref_model=ref)

    @torch.no_grad()
    def logp(model, s):  # one unpadded sequence; completion = tokens after the rendered prompt
        ids, mask = enc.get(s)
        logits = model(torch.tensor([ids.tolist()])).logits[0].log_softmax(-1)
        return sum(float(logits[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])

    total, acc = 0.0, 0
    for c, r in pairs:
        d = (logp(policy, c) - logp(ref, c)) - (logp(policy, r) - logp(ref, r))
        total += -_logsig(beta * d)
        acc += (beta * (logp(policy, c) - logp(ref, c)) > beta * (logp(policy, r) - logp(ref, r)))
    assert float(loss) == pytest.approx(total, rel=1e-4)
    assert float(stats["rewards/accuracy"]) == acc
    # RPO: + alpha x each chosen answer's mean per-token NLL
    with torch.no_grad():
        rpo_loss, rpo_stats = pair_loss(policy, batch, beta=beta, ref_model=ref, rpo_alpha=0.5)
    nll = [-logp(policy, c) / int(enc.get(c)[1][1:].sum()) for c, _ in pairs]
    assert float(rpo_stats["nll/chosen"]) == pytest.approx(sum(nll), rel=1e-4)
    assert float(rpo_loss) == pytest.approx(total + 0.5 * sum(nll), rel=1e-4)
    # The completion is exactly the assistant reply and its end-of-turn token.
    ids, mask = enc.get(pairs[0][0])
    assert tok.decode([int(i) for i, m in zip(ids, mask) if m]) == "Four.</s>"


# ------------------------------------------------------------------------------------------------
# Training

@pytest.mark.parametrize("precompute", [True, False])
def test_loss_is_log2_at_step_0(model_dir, tmp_path, precompute):
    from upstack.train.dpo import dpo

    summary = dpo(dpo_cfg(model_dir, tmp_path, [str(pair_file(tmp_path))], precompute_ref=precompute))
    first = train_records(tmp_path / "out")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-4)
    assert summary["steps"] == 1


def test_reward_margin_and_accuracy_go_up(model_dir, tmp_path):
    from upstack.train.dpo import dpo

    summary = dpo(dpo_cfg(model_dir, tmp_path, [str(pair_file(tmp_path))], max_steps=30, batch_size=4,
                          learning_rate=2e-3, lr_scheduler="constant", eval_fraction=0.25))
    recs = train_records(tmp_path / "out")
    assert recs[0]["rewards/accuracy"] == 0.0 and recs[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-4)
    late = recs[-5:]
    assert min(r["rewards/margin"] for r in late) > 0.5
    assert sum(r["rewards/accuracy"] for r in late) / len(late) >= 0.9
    assert recs[-1]["loss"] < 0.3 * recs[0]["loss"]   # overfits the small preference set
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "tokens_per_s", "lr"):
        assert key in recs[0]
    assert "eval_rewards/margin" in summary and "eval_loss" in summary


def test_rpo_alpha_keeps_the_chosen_answers_likely(model_dir, tmp_path):
    """The NLL term (rpo_alpha) keeps the chosen answers far more likely than plain DPO does (here, from
    the same start: log-prob -16 vs -35 after 20 steps), while the reward margin still grows."""
    from upstack.train.dpo import dpo

    data = [str(pair_file(tmp_path))]
    runs = {}
    for alpha in (0.0, 1.0):
        out = tmp_path / f"out{alpha}"
        dpo(dpo_cfg(model_dir, tmp_path, data, out=str(out), max_steps=20, batch_size=4, learning_rate=3e-3,
                    lr_scheduler="constant", rpo_alpha=alpha))
        runs[alpha] = train_records(out)
    plain, rpo = runs[0.0], runs[1.0]
    assert plain[0]["logps/chosen"] == pytest.approx(rpo[0]["logps/chosen"], rel=1e-5)  # same start
    assert plain[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rpo[0]["loss"] == pytest.approx(math.log(2) + rpo[0]["nll/chosen"], rel=1e-4)
    assert rpo[-1]["logps/chosen"] > plain[-1]["logps/chosen"] + 1.0
    assert rpo[-1]["nll/chosen"] < rpo[0]["nll/chosen"]
    assert rpo[-1]["rewards/margin"] > 0.5


def test_separate_reference_model_kept_in_memory_or_precomputed(model_dir, tmp_path):
    from upstack.train.dpo import dpo

    other = build_tiny_model(tmp_path / "ref", "llama", num_hidden_layers=2, vocab_size=256, seed=7)
    data = [str(pair_file(tmp_path))]
    a = dpo(dpo_cfg(model_dir, tmp_path, data, ref_model=str(other), precompute_ref=True))
    b = dpo(dpo_cfg(model_dir, tmp_path, data, ref_model=str(other), precompute_ref=False, overwrite=True))
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)
    assert abs(a["final_rewards/chosen"]) > 1e-2   # a different reference: policy != reference at step 0


def test_ipo_and_real_preference_sample(tmp_path, shared_data):
    from upstack.train.dpo import dpo

    m = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2, vocab_size=260)
    data = f"{shared_data / 'dpo_mix_en' / 'dpo_en_demo.jsonl'}:samples=6"
    summary = dpo(dpo_cfg(m, tmp_path, [data], loss_type="ipo", max_length=1500))
    assert summary["truncated"] > 0 and summary["train_pairs"] >= 2   # long rows: truncated, counted
    first = train_records(tmp_path / "out")[0]
    assert first["loss"] == pytest.approx((1 / (2 * 0.1)) ** 2, rel=1e-4)   # d = 0 at the start


def test_bad_dpo_options(model_dir, tmp_path, capsys):
    from upstack.cli import main

    data = pair_file(tmp_path)
    assert main(["dpo", "-q", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--beta", "0"]) == 2
    assert "beta" in capsys.readouterr().err
    assert main(["dpo", "-q", str(model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 "--rpo-alpha", "-1"]) == 2
    assert "rpo_alpha" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    rows = [{"prompt": "q", "chosen": "a"}]
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert main(["dpo", "-q", str(model_dir), "--data", f"{tmp_path / 'bad.jsonl'}:format=preference",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "row 1" in err and "rejected" in err


# ------------------------------------------------------------------------------------------------
# The reference log-prob cache (<out>.work/ref_logps.safetensors) knows its inputs

class _Crash(Exception):
    pass


def _crash_at_step_1(run, step):
    if step == 1:
        raise _Crash()


@pytest.mark.parametrize("change", [None, "data", "ref_model"])
def test_reference_logp_cache_is_rebuilt_when_its_inputs_change(model_dir, tmp_path, monkeypatch, change):
    """A run that crashed after scoring the reference leaves its cache in the work folder. Run again with the
    same inputs: the cache is reused as it is. Change the data file's content or the reference model's
    weights (same paths): the cache is scored again, and the loss curve is a fresh run's on the new inputs."""
    from safetensors.torch import load_file

    from upstack.train import loop
    from upstack.train.dpo import _cache_key, dpo

    ref = build_tiny_model(tmp_path / "ref", "llama", num_hidden_layers=2, vocab_size=256, seed=1)
    data = pair_file(tmp_path)
    cache = tmp_path / "out.work" / "ref_logps.safetensors"

    def run(out, **kw):
        return dpo(dpo_cfg(model_dir, tmp_path, [str(data)], out=str(out), ref_model=str(ref), max_steps=3,
                           learning_rate=1e-3, keep_checkpoints=True, **kw))

    monkeypatch.setattr(loop, "STEP_CALLBACKS", [_crash_at_step_1])
    with pytest.raises(_Crash):
        run(tmp_path / "out")
    assert cache.is_file() and not (tmp_path / "out").exists()
    old_key, old_values, old_mtime = _cache_key(cache), load_file(str(cache))["train"], cache.stat().st_mtime_ns
    if change == "data":   # the same file, its pairs' sides swapped
        rows = [json.loads(x) for x in data.read_text().splitlines()]
        data.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                                for r in rows))
    elif change == "ref_model":   # the same folder, other weights
        build_tiny_model(tmp_path / "ref", "llama", num_hidden_layers=2, vocab_size=256, seed=2)
    monkeypatch.setattr(loop, "STEP_CALLBACKS", [])
    run(tmp_path / "out")
    new_values = load_file(str(cache))["train"]
    if change is None:
        assert _cache_key(cache) == old_key and cache.stat().st_mtime_ns == old_mtime
        assert torch.equal(new_values, old_values)
    else:
        assert _cache_key(cache) != old_key and not torch.equal(new_values, old_values)
    run(tmp_path / "fresh")   # the same inputs, no cache
    assert torch.equal(load_file(str(tmp_path / "fresh.work" / "ref_logps.safetensors"))["train"], new_values)
    got, want = train_records(tmp_path / "out"), train_records(tmp_path / "fresh")
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["rewards/margin"] for r in got] == [r["rewards/margin"] for r in want]
