"""`upstack generate` on tiny models: greedy replies are what transformers' greedy generate gives on the
chat-rendered prompt, sampling is seeded, --output rows, bad prompt rows and a folder without a tokenizer
are one line, an unmerged adapter replies as the merged model; and an eval's `samples:` reach report.md."""

import json
from pathlib import Path

import pytest
from tiny import build_tiny_model

from upstack.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 260


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("gen") / "tiny", "llama", num_hidden_layers=2, vocab_size=VOCAB)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _greedy(model_dir, ids, n):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True).strip()


def test_greedy_reply_is_transformers_greedy_on_the_chat_prompt(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    prompt = "Question: what is 12 plus 30?"
    out = tmp_path / "r.jsonl"
    assert main(["generate", str(tiny), "--prompt", prompt, "--prompt", "Depth up-scaling", "--max-new-tokens", "12",
                 "--output", str(out), "--quiet"]) == 0
    rows = _rows(out)
    assert [r["prompt"] for r in rows] == [prompt, "Depth up-scaling"]
    chat_ids = tok(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"]
    assert rows[0]["reply"] == _greedy(tiny, chat_ids, 12)
    assert set(rows[0]) == {"prompt", "reply", "new_tokens", "finish_reason", "model", "adapter", "chat",
                            "max_new_tokens", "temperature", "top_p", "seed"}
    assert rows[0]["chat"] is True and rows[0]["temperature"] == 0.0 and 1 <= rows[0]["new_tokens"] <= 12
    assert rows[0]["finish_reason"] == ("length" if rows[0]["new_tokens"] == 12 else "stop")
    # same again: greedy is deterministic; --output exists now: refused before any work, then --overwrite
    assert main(["generate", str(tiny), "--prompt", prompt, "--output", str(out)]) == 2
    assert "already exists" in _error_line(capsys)
    assert main(["generate", str(tiny), "--prompt", prompt, "--prompt", "Depth up-scaling", "--max-new-tokens", "12",
                 "--output", str(out), "--overwrite", "--quiet"]) == 0
    assert _rows(out) == rows
    capsys.readouterr()
    # --no-chat: the raw text
    assert main(["generate", str(tiny), "--prompt", prompt, "--no-chat", "--max-new-tokens", "12", "--json"]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw[0]["chat"] is False and raw[0]["reply"] == _greedy(tiny, tok(prompt)["input_ids"], 12)


def test_sampling_same_seed_same_text(tiny, capsys):
    def sample(seed):
        assert main(["generate", str(tiny), "--prompt", "The quick brown fox", "--temperature", "1.0", "--top-p",
                     "0.95", "--seed", str(seed), "--max-new-tokens", "16", "--json"]) == 0
        return json.loads(capsys.readouterr().out)[0]["reply"]

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and a != c


def test_streams_to_the_terminal(tiny, capsys):
    assert main(["generate", str(tiny), "--prompt", "Hello there", "--max-new-tokens", "8"]) == 0
    streamed = capsys.readouterr().out
    assert main(["generate", str(tiny), "--prompt", "Hello there", "--max-new-tokens", "8", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)[0]["reply"]
    assert streamed.startswith(">>> Hello there\n") and reply in streamed


def test_prompts_file_rows_and_bad_rows(tiny, tmp_path, capsys):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "Hi"}) + "\n"
                    + json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi"}]}) + "\n")
    assert main(["generate", str(tiny), "--prompts", str(good), "--max-new-tokens", "4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["prompt"] == "Hi" and rows[1]["messages"][0]["role"] == "system" and len(rows) == 2
    for line, want in [(json.dumps({"text": "Hi"}), "line 2: needs 'prompt' (a string) or 'messages'"),
                       ("{not json", "line 2: not valid JSON"),
                       (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "line 2: messages[0] must be"),
                       (json.dumps({"prompt": ""}), "line 2: 'prompt' must be a non-empty string")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
        assert main(["generate", str(tiny), "--prompts", str(bad)]) == 2
        err = _error_line(capsys)
        assert f"{bad}: {want}" in err, err
    msgs = tmp_path / "m.jsonl"
    msgs.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    assert main(["generate", str(tiny), "--prompts", str(msgs), "--no-chat"]) == 2
    assert "a 'messages' row needs a chat template (--no-chat was given)" in _error_line(capsys)


def test_folder_without_tokenizer(tmp_path, capsys):
    bare = build_tiny_model(tmp_path / "bare", "llama", num_hidden_layers=1, vocab_size=VOCAB, tokenizer=False)
    assert main(["generate", str(bare), "--prompt", "hi"]) == 2
    assert f"error: {bare}: no tokenizer in the folder" in _error_line(capsys)


def test_bad_options(tiny, capsys):
    assert main(["generate", str(tiny)]) == 2
    assert "nothing to say" in _error_line(capsys)
    assert main(["generate", str(tiny), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p must be in (0, 1]" in _error_line(capsys)


def test_adapter_unmerged_replies_as_the_merged_model(tiny, tmp_path, capsys):
    """--adapter runs PEFT's LoRA layers beside the base's; `upstack merge-adapter` folds them in: same greedy
    replies, logits equal up to float rounding."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                        LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(20)  # an adapter that changes the replies
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    merged = tmp_path / "merged"
    assert main(["merge-adapter", str(tiny), str(adapter), str(merged), "--quiet"]) == 0
    capsys.readouterr()
    args = ["--prompt", "Question: what is 12 plus 30?", "--prompt", "Hello", "--max-new-tokens", "16", "--json"]
    assert main(["generate", str(tiny), "--adapter", str(adapter), *args]) == 0
    with_adapter = json.loads(capsys.readouterr().out)
    assert main(["generate", str(merged), *args]) == 0
    with_merged = json.loads(capsys.readouterr().out)
    assert main(["generate", str(tiny), *args]) == 0
    base = json.loads(capsys.readouterr().out)
    assert [r["reply"] for r in with_adapter] == [r["reply"] for r in with_merged]
    assert [r["reply"] for r in with_adapter] != [r["reply"] for r in base]
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), adapter).eval()
    with torch.no_grad():
        a = unmerged(ids).logits
        b = AutoModelForCausalLM.from_pretrained(merged).eval()(ids).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_adapter_that_does_not_fit(tiny, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    other = build_tiny_model(tmp_path / "other", "llama", num_hidden_layers=2, vocab_size=VOCAB, hidden_size=32)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=2, target_modules="all-linear"))
    pm.save_pretrained(tmp_path / "adapter")
    assert main(["generate", str(tiny), "--adapter", str(tmp_path / "adapter"), "--prompt", "x"]) == 2
    assert "does not fit base" in _error_line(capsys)


def test_eval_samples_reach_the_report_side_by_side(tiny, tmp_path):
    """An eval entry's `samples:` puts each model's greedy replies in its results.json, and report.md shows
    them per prompt, a row per model: the same text `upstack generate` gives."""
    from upstack.pipeline import load_recipe, run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: s\nstages:\n"
        f"  stacked: {{type: upscale, source: {tiny}, method: stack}}\n"
        f"  dus: {{type: upscale, source: {tiny}, m: 1}}\n"
        "evaluate:\n  models: [stacked, dus]\n"
        "  samples: ['Hello there', {messages: [{role: user, content: 'What is 2+2?'}]}]\n"
        "  sample_max_new_tokens: 6\n")
    run_recipe(load_recipe(recipe, run_dir=tmp_path / "run"), quiet=True, log=lambda *_: None)
    res = json.loads((tmp_path / "run" / "eval_dus" / "results.json").read_text())
    assert [r.get("prompt") for r in res["replies"]] == ["Hello there", None]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Replies" in report and "**Hello there**" in report and "**What is 2+2?**" in report
    for model in ("stacked", "dus"):
        out = tmp_path / f"{model}.jsonl"
        assert main(["generate", str(tmp_path / "run" / model), "--prompt", "Hello there", "--max-new-tokens", "6",
                     "--output", str(out), "--quiet"]) == 0
        reply = _rows(out)[0]["reply"]
        mine = json.loads((tmp_path / "run" / f"eval_{model}" / "results.json").read_text())["replies"][0]
        assert mine["reply"] == reply
        cell = reply.replace("|", "\\|").replace("\n", "<br>") or "(empty)"
        assert any(line.startswith(f"| {model} | {cell}") for line in report.splitlines()), (model, cell)
