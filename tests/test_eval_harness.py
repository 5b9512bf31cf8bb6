"""`upstack eval`: every local H6 task on a tiny model over the real samples, results files, compare, errors."""

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from tiny import build_tiny_model

from upstack.cli import main

# The tiny byte-level tokenizer has 260 tokens (256 bytes + 4 specials); the model must cover them all.
VOCAB = 260


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("eval") / "tiny", "llama", num_hidden_layers=2,
                                vocab_size=VOCAB))


def _rows(path: Path) -> int:
    """Documents in a benchmark file, counted independently of upstack's readers."""
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as fh:
            return sum(1 for _ in csv.reader(fh))
    return sum(1 for line in open(path, encoding="utf-8") if line.strip())


@pytest.fixture(scope="module")
def h6_run(tiny_model, tmp_path_factory):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data samples not found at {SHARED_DATA} (set UPSTACK_SHARED_DATA)")
    out = tmp_path_factory.mktemp("h6") / "h6.json"
    rc = main(["eval", tiny_model, "--tasks", "h6", "--data-dir", str(SHARED_DATA), "--limit", "3",
               "--device", "cpu", "--output", str(out), "--quiet"])
    assert rc == 0
    return json.loads(out.read_text()), out, SHARED_DATA


def test_h6_local_scores_every_task(h6_run):
    res, out, shared = h6_run
    assert res["format"] == "upstack-eval/1" and res["tasks"] == [
        "arc_challenge_local", "hellaswag_local", "mmlu_local", "truthfulqa_mc2_local", "winogrande_local", "gsm8k_local"]
    metric = {"arc_challenge_local": "acc_norm", "hellaswag_local": "acc_norm", "mmlu_local": "acc",
              "truthfulqa_mc2_local": "acc", "winogrande_local": "acc", "gsm8k_local": "exact_match,strict-match"}
    shots = {"arc_challenge_local": 25, "hellaswag_local": 10, "mmlu_local": 5, "truthfulqa_mc2_local": 0,
             "winogrande_local": 5, "gsm8k_local": 5}
    for task, m in metric.items():
        value = res["results"][task][m]
        assert 0.0 <= value <= 1.0, (task, value)
        assert res["num_fewshot"][task] == shots[task]
    # a random model: MC2 is a probability mass on the true answers, strictly inside (0, 1)
    assert 0 < res["results"]["truthfulqa_mc2_local"]["acc"] < 1
    # H6 = plain mean of the six leaderboard metrics
    expected = sum(res["results"][t][m] for t, m in metric.items()) / 6
    assert res["h6"]["score"] == pytest.approx(expected)
    assert set(res["h6"]["tasks"]) == {"arc", "hellaswag", "mmlu", "truthfulqa", "winogrande", "gsm8k"}
    md = out.with_suffix(".md").read_text()
    assert "| **H6** |" in md and "mmlu_local_anatomy" not in md
    assert res["model"] and res["date"] and res["config"]["limit"] == 3 and res["versions"]["lm_eval"]


def test_h6_local_document_counts_match_files(h6_run):
    res, _, shared = h6_run
    files = {
        "arc_challenge_local": shared / "arc_challenge" / "ARC-Challenge-Dev.jsonl",  # Dev scored, Train few-shot
        "hellaswag_local": shared / "hellaswag" / "hellaswag_val_sample500.jsonl",
        "truthfulqa_mc2_local": shared / "truthfulqa" / "mc_task_first400.jsonl",
        "winogrande_local": shared / "winogrande" / "train_xs.jsonl",
        "gsm8k_local": shared / "gsm8k" / "train_first500.jsonl",
    }
    for task, f in files.items():
        assert res["data_files"][task]["eval"] == str(f)
        assert res["n_samples"][task] == {"original": _rows(f), "effective": 3}, task
    assert res["data_files"]["arc_challenge_local"]["fewshot"].endswith("ARC-Challenge-Train.jsonl")
    val = sorted((shared / "mmlu" / "val").glob("*.csv"))
    assert len(res["groups"]["mmlu_local"]) == len(val) == 57
    for f in val:
        subject = f.stem.removesuffix("_val")
        assert res["n_samples"][f"mmlu_local_{subject}"]["original"] == _rows(f)
        assert res["data_files"][f"mmlu_local_{subject}"]["fewshot"].endswith(f"dev/{subject}_dev.csv")
    assert res["n_samples"]["mmlu_local"]["original"] == sum(_rows(f) for f in val) == 1531


def test_single_files_per_task_and_compare(tiny_model, shared_data, tmp_path, capsys):
    """The demo's case: its own held-out sets in GSM8K and ARC formats, one file each, plus perplexity."""
    gsm = tmp_path / "heldout_gsm8k.jsonl"
    gsm.write_text("".join(open(shared_data / "gsm8k" / "train_first500.jsonl").readlines()[:4]))
    arc_rows = open(shared_data / "arc_challenge" / "ARC-Challenge-Dev.jsonl").readlines()
    numeric = [r for r in arc_rows if json.loads(r)["answerKey"] in "1234"]
    arc = tmp_path / "heldout_arc.jsonl"
    arc.write_text("".join(arc_rows[:3] + numeric))
    text = tmp_path / "heldout.txt"
    text.write_text(open(shared_data / "wikitext2" / "wiki.test.raw", encoding="utf-8").read()[:3000])
    out = tmp_path / "sft.json"
    rc = main(["eval", tiny_model, "--tasks", "gsm8k_local,arc_challenge_local", "--task-file", f"gsm8k_local={gsm}",
               "--task-file", f"arc_challenge_local={arc}", "--num-fewshot", "1", "--max-gen-toks", "16",
               "--perplexity", str(text), "--output", str(out), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["n_samples"]["gsm8k_local"] == {"original": 4, "effective": 4}
    assert res["n_samples"]["arc_challenge_local"] == {"original": 7, "effective": 7}
    assert res["num_fewshot"] == {"gsm8k_local": 1, "arc_challenge_local": 1}
    assert res["data_files"]["gsm8k_local"] == {"eval": str(gsm), "fewshot": str(gsm)}
    assert res["h6"] is None
    ppl = res["perplexity"][str(text)]
    assert ppl["tokens"] > 1000 and 1 < ppl["perplexity"] < VOCAB * 4 and ppl["bits_per_byte"] > 0
    table = capsys.readouterr().out
    assert "| gsm8k_local | exact_match,strict-match |" in table and "ppl: heldout.txt" in table

    # a second "stage": the same model under another seed, then the side-by-side table
    out2 = tmp_path / "dpo.json"
    assert main(["eval", tiny_model, "--tasks", "arc_challenge_local", "--task-file", f"arc_challenge_local={arc}",
                 "--num-fewshot", "arc_challenge_local=0", "--output", str(out2), "--quiet"]) == 0
    assert json.loads(out2.read_text())["num_fewshot"]["arc_challenge_local"] == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(out), str(out2)]) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert "(sft)" in header and "(dpo)" in header
    arc_line = next(line for line in table.splitlines() if line.startswith("| arc_challenge_local"))
    assert arc_line.count("|") == 5
    gsm_line = next(line for line in table.splitlines() if line.startswith("| gsm8k_local"))
    assert gsm_line.rstrip().endswith("– |")
    assert main(["eval", "--compare", str(out), str(out2), "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["columns"] == [f"{Path(tiny_model).name} (sft)", f"{Path(tiny_model).name} (dpo)"]


def test_python_api_perplexity_only(tiny_model, tmp_path):
    from upstack.evaluate import EvalConfig, evaluate

    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"body": f"Document {i}: the quick brown fox jumps over the lazy dog."}) + "\n"
                         for i in range(5)))
    res = evaluate(EvalConfig(model=tiny_model, perplexity=[str(f)], text_field="body", device="cpu"))
    p = res["perplexity"][str(f)]
    assert p["documents"] == 5 and math.isfinite(p["perplexity"]) and res["results"] == {}


# ------------------------------------------------------------------------------------------ errors
def _err(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_unknown_task_lists_known_ones(tiny_model, capsys):
    err = _err(capsys, ["eval", tiny_model, "--tasks", "arc_chalenge"])
    assert "unknown task(s) arc_chalenge" in err and "arc_challenge_local" in err and "h6" in err
    assert "did you mean arc_challenge" in err
    err = _err(capsys, ["eval", tiny_model, "--tasks", "winograd_local", "--data-dir", "."])
    assert "unknown task winograd_local" in err and "did you mean winogrande_local" in err


def test_offline_real_task_names_local_alternative(tiny_model, capsys):
    err = _err(capsys, ["eval", tiny_model, "--tasks", "hellaswag", "--limit", "1"])
    assert "offline" in err and "--tasks hellaswag_local --data-dir" in err


@pytest.mark.parametrize("name, content, expect", [
    ("arc.jsonl", '{"id": "1", "question": {"stem": "Q", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "A"}\n',
     "line 1: field 'question.choices' needs at least 2 choices"),
    ("gsm.jsonl", '{"question": "q", "answer": "4"}\n', "line 1: field 'answer' should end with '#### <number>'"),
    ("gsm.jsonl", '{"question": "q"}\n', "line 1: missing field 'answer'"),
    ("gsm.jsonl", "question,answer\n", "line 1: not valid JSON"),
])
def test_wrong_format_names_file_row_field(tiny_model, tmp_path, capsys, name, content, expect):
    f = tmp_path / name
    f.write_text(content)
    task = "arc_challenge_local" if name.startswith("arc") else "gsm8k_local"
    err = _err(capsys, ["eval", tiny_model, "--tasks", task, "--task-file", f"{task}={f}"])
    assert str(f) in err and expect in err


def test_mmlu_wrong_columns(tiny_model, tmp_path, capsys):
    d = tmp_path / "mmlu" / "val"
    d.mkdir(parents=True)
    (d / "anatomy_val.csv").write_text("q,a,b,c,d\n")
    err = _err(capsys, ["eval", tiny_model, "--tasks", "mmlu_local", "--data-dir", str(tmp_path)])
    assert "anatomy_val.csv: record 1: expected 6 columns" in err


def test_model_not_loadable(tmp_path, capsys, shared_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _err(capsys, ["eval", str(empty), "--tasks", "gsm8k_local", "--data-dir", str(shared_data)])
    assert "not a loadable checkpoint folder (no config.json)" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')
    err = _err(capsys, ["eval", str(broken), "--tasks", "gsm8k_local", "--data-dir", str(shared_data), "--limit", "1"])
    assert f"cannot load model {broken}" in err
    err = _err(capsys, ["eval", str(tmp_path / "nope"), "--tasks", "gsm8k_local", "--data-dir", str(shared_data)])
    assert "no such folder" in err


def test_option_errors(tiny_model, tmp_path, capsys, shared_data):
    assert "needs local data" in _err(capsys, ["eval", tiny_model, "--tasks", "gsm8k_local"])
    assert "not a local task" in _err(capsys, ["eval", tiny_model, "--tasks", "gsm8k", "--task-file", "gsm8k=x.jsonl"])
    assert "nothing to do" in _err(capsys, ["eval", tiny_model])
    assert "expected TASK=PATH" in _err(capsys, ["eval", tiny_model, "--tasks", "h6", "--task-file", "x.jsonl"])
    assert "no such folder" in _err(capsys, ["eval", tiny_model, "--tasks", "h6", "--data-dir", str(tmp_path / "nope")])
    assert "<data-dir>/gsm8k/" in _err(capsys, ["eval", tiny_model, "--tasks", "gsm8k_local", "--data-dir", str(tmp_path)])
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert "not an `upstack eval` results file" in _err(capsys, ["eval", "--compare", str(bad)])
    assert "file not found" in _err(capsys, ["eval", tiny_model, "--perplexity", str(tmp_path / "none.txt")])
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        assert "needs vLLM" in _err(capsys, ["eval", tiny_model, "--tasks", "h6", "--backend", "vllm"])


def test_configs_fill_from_recipe_mappings():
    """A recipe's `evaluate:`/`contamination:` sections fill the same dataclasses through config_from_dict."""
    from upstack.config import config_from_dict
    from upstack.data.decontaminate import DecontaminateConfig
    from upstack.errors import ConfigError
    from upstack.evaluate import ContaminationConfig, EvalConfig

    cfg = config_from_dict(EvalConfig, {"model": "m", "tasks": ["h6"], "data_dir": "d", "limit": 5,
                                        "batch_size": "auto", "task_files": {"gsm8k_local": "g.jsonl"},
                                        "model_args": {"tensor_parallel_size": 2}, "backend": "vllm"}, "evaluate")
    assert cfg.limit == 5 and cfg.batch_size == "auto" and cfg.backend == "vllm"
    with pytest.raises(ConfigError, match="evaluate.backend"):
        config_from_dict(EvalConfig, {"model": "m", "backend": "tgi"}, "evaluate")
    with pytest.raises(ConfigError, match="unknown option"):
        config_from_dict(EvalConfig, {"model": "m", "taks": ["h6"]}, "evaluate")
    c = config_from_dict(ContaminationConfig, {"model": "m", "reference": "r", "benchmarks": ["b.jsonl"],
                                               "method": "min-k", "num_examples": 10}, "contamination")
    assert c.method == "min-k" and c.num_neighbours == 100
    d = config_from_dict(DecontaminateConfig, {"data": "x", "against": ["b"], "out": "o", "fields": ["text"]}, "d")
    assert d.ngram == 13


def test_unreachable_hub_fails_a_hub_task_at_once(tiny_model, capsys, monkeypatch):
    """HF_HUB_OFFLINE unset but the Hub unreachable: the datasets library is switched to its cache at once
    (it would otherwise retry for ~25 s) and the error says the Hub cannot be reached."""
    import datasets

    import upstack.evaluate.bridge as bridge

    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(bridge, "hub_reachable", lambda: False)
    err = _err(capsys, ["eval", tiny_model, "--tasks", "hellaswag", "--limit", "1"])
    assert "the Hub (huggingface.co) cannot be reached" in err and "--tasks hellaswag_local --data-dir" in err
    assert datasets.config.HF_HUB_OFFLINE is True


def test_hub_reachable_probes_the_endpoint(monkeypatch):
    import socket

    from upstack import hub

    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY",
              "all_proxy"):
        monkeypatch.delenv(v, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setattr(hub, "_REACHABLE", {})
        assert hub.hub_reachable()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    assert not hub.hub_reachable(timeout=1.0)
    # Behind a proxy only the proxy is probed: an endpoint this machine cannot resolve is reachable through it.
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
        monkeypatch.setattr(hub, "_REACHABLE", {})
        assert hub.hub_reachable(timeout=1.0)
    monkeypatch.setattr(hub, "_REACHABLE", {})
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed}")   # a proxy that does not answer
    assert not hub.hub_reachable(timeout=1.0)
