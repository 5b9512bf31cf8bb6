"""`upstack eval --preference`: chosen-vs-rejected log-prob accuracy under the chat template, checked
against log-probs computed here token by token; implicit rewards; groups; CLI, tables and bad input."""

import json

import pytest
from tiny import build_tiny_model

from upstack.cli import main
from upstack.errors import DataError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAIRS = [("What is two plus two?", "Four.", "Seven, obviously.", "math"),
         ("Name a color.", "Blue.", "A dog is a color.", "facts"),
         ("Say hello.", "Hello there.", "No.", "chat"),
         ("Count to three.", "One, two, three.", "Three, one.", "math"),
         ("What is 12 plus 30?", "42.", "Forty-three, I think.", "math")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    policy = build_tiny_model(root / "policy", "llama", num_hidden_layers=2, vocab_size=256, seed=0)
    ref = build_tiny_model(root / "ref", "llama", num_hidden_layers=2, vocab_size=256, seed=1)
    return policy, ref


def write_pairs(path, rows=PAIRS, swap=False):
    out = []
    for q, c, r, kind in rows:
        if swap:
            c, r = r, c
        out.append({"prompt": q, "chosen": c, "rejected": r, "kind": kind})
    path.write_text("".join(json.dumps(x) + "\n" for x in out))
    return path


@torch.no_grad()
def completion_logp(model_dir, question, answer):
    """Summed log-prob of `answer` and its end-of-turn token after the rendered prompt, one token at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                     add_generation_prompt=True)
    p_ids = tok(prompt)["input_ids"]
    ids = tok(prompt + answer + tok.eos_token)["input_ids"]
    assert ids[:len(p_ids)] == p_ids
    logits = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(float(logits[t - 1, ids[t]]) for t in range(len(p_ids), len(ids))), len(ids) - len(p_ids)


def test_metrics_match_log_probs_computed_by_hand(models, tmp_path):
    from upstack.evaluate.preference import preference

    policy, ref = models
    f = write_pairs(tmp_path / "pairs.jsonl")
    got = preference(str(policy), f, reference=str(ref), group_field="kind", batch_size=4)
    lp = {p: [(completion_logp(p, q, c), completion_logp(p, q, r)) for q, c, r, _ in PAIRS] for p in (policy, ref)}
    diffs = [c[0] - r[0] for c, r in lp[policy]]
    per_tok = [c[0] / c[1] - r[0] / r[1] for c, r in lp[policy]]
    rewards = [(pc[0] - rc[0]) - (pr[0] - rr[0]) for (pc, pr), (rc, rr) in zip(lp[policy], lp[ref])]
    n = len(PAIRS)
    assert got["pairs"] == got["scored"] == n and got["dropped"] == 0 and got["template"] == "chat"
    assert got["accuracy"] == pytest.approx(sum(d > 0 for d in diffs) / n)
    assert got["accuracy_per_token"] == pytest.approx(sum(d > 0 for d in per_tok) / n)
    assert got["margin"] == pytest.approx(sum(diffs) / n, rel=1e-4)
    assert got["chosen_logp"] == pytest.approx(sum(c[0] for c, _ in lp[policy]) / n, rel=1e-4)
    assert got["chosen_nll_per_token"] == pytest.approx(
        -sum(c[0] for c, _ in lp[policy]) / sum(c[1] for c, _ in lp[policy]), rel=1e-4)
    assert got["reward_accuracy"] == pytest.approx(sum(d > 0 for d in rewards) / n)
    assert got["reward_margin"] == pytest.approx(sum(rewards) / n, rel=1e-4, abs=1e-4)
    # groups: the same metrics over each kind's rows
    math_rows = [i for i, p in enumerate(PAIRS) if p[3] == "math"]
    assert sorted(got["groups"]) == ["chat", "facts", "math"]
    g = got["groups"]["math"]
    assert g["pairs"] == g["scored"] == 3
    assert g["margin"] == pytest.approx(sum(diffs[i] for i in math_rows) / 3, rel=1e-4)
    assert g["reward_accuracy"] == pytest.approx(sum(rewards[i] > 0 for i in math_rows) / 3)


def test_swapping_chosen_and_rejected_mirrors_the_metrics(models, tmp_path):
    from upstack.evaluate.preference import preference

    policy, _ = models
    a = preference(str(policy), write_pairs(tmp_path / "a.jsonl"))
    b = preference(str(policy), write_pairs(tmp_path / "b.jsonl", swap=True))
    assert a["margin"] == pytest.approx(-b["margin"], rel=1e-5)
    assert a["accuracy"] == pytest.approx(1.0 - b["accuracy"])  # no ties between different answers
    assert a["chosen_logp"] == pytest.approx(b["rejected_logp"], rel=1e-5)


def test_a_model_self_reference_has_zero_reward_margin(models, tmp_path):
    from upstack.evaluate.preference import preference

    policy, _ = models
    got = preference(str(policy), write_pairs(tmp_path / "p.jsonl"), reference=str(policy))
    assert got["reward_margin"] == pytest.approx(0.0, abs=1e-4)


def test_cli_writes_results_tables_and_compare(models, tmp_path, capsys):
    policy, ref = models
    f = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "res.json"
    assert main(["eval", str(policy), "--preference", str(f), "--preference-group", "kind",
                 "--preference-reference", str(ref), "--output", str(out), "--quiet"]) == 0
    res = json.loads(out.read_text())
    p = res["preference"][str(f)]
    assert set(p["groups"]) == {"chat", "facts", "math"} and p["reference"] == str(ref)
    assert res["config"]["preference_group"] == "kind"
    md = out.with_suffix(".md").read_text()
    assert f"| pref: pairs.jsonl | accuracy | {p['accuracy']:.4f} | | 5 | |" in md
    assert f"| pref: pairs.jsonl [math] | margin | {p['groups']['math']['margin']:.4f} | | 3 | |" in md
    capsys.readouterr()
    assert main(["eval", "--compare", str(out), str(out)]) == 0
    table = capsys.readouterr().out
    assert "| pref: pairs.jsonl [facts] | reward_accuracy |" in table
    # the report flattens the same numbers for a run's results.json
    from upstack.report import _flat_scores

    flat, _ = _flat_scores(res)  # (values, stderr and n per value)
    assert flat["preference/pairs.jsonl/accuracy"] == p["accuracy"]
    assert flat["preference/pairs.jsonl[math]/margin"] == p["groups"]["math"]["margin"]


def test_alpaca_template_and_limit(models, tmp_path):
    from upstack.evaluate.preference import preference

    policy, _ = models
    f = write_pairs(tmp_path / "pairs.jsonl")
    a = preference(str(policy), f, template="alpaca", limit=2)
    assert a["template"] == "alpaca" and a["pairs"] == a["scored"] == 2
    c = preference(str(policy), f, limit=2)
    assert a["chosen_logp"] != pytest.approx(c["chosen_logp"])  # another rendering, other log-probs


def test_bad_input(models, tmp_path, capsys):
    policy, _ = models
    f = write_pairs(tmp_path / "pairs.jsonl")
    assert main(["eval", str(policy), "--preference", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl: file not found" in capsys.readouterr().err
    assert main(["eval", str(policy), "--preference-group", "kind", "--perplexity", str(f)]) == 2
    assert "need --preference FILE" in capsys.readouterr().err
    rows = f.read_text().splitlines()
    bad = json.loads(rows[2])
    del bad["kind"]
    rows[2] = json.dumps(bad)
    g = tmp_path / "nokind.jsonl"
    g.write_text("\n".join(rows) + "\n")
    assert main(["eval", str(policy), "--preference", str(g), "--preference-group", "kind"]) == 2
    err = capsys.readouterr().err
    assert "nokind.jsonl: line 3" in err and "'kind'" in err and "Traceback" not in err
    h = tmp_path / "broken.jsonl"
    h.write_text('{"prompt": "Hi", "chosen": "Hello"}\n')
    assert main(["eval", str(policy), "--preference", str(h)]) == 2
    assert "broken.jsonl" in capsys.readouterr().err
    out = tmp_path / "never.json"
    assert main(["eval", str(policy), "--preference", str(g), "--preference-group", "kind", "-o", str(out)]) == 2
    assert not out.exists()


def test_reference_with_another_tokenizer_is_refused(models, tmp_path):
    from upstack.evaluate.preference import preference

    policy, _ = models
    other = build_tiny_model(tmp_path / "other", "llama", num_hidden_layers=1, vocab_size=300)
    with pytest.raises(DataError, match="renders the pairs differently"):
        preference(str(policy), write_pairs(tmp_path / "p.jsonl"), reference=str(other))
