"""`upstack eval --log-samples` (lm-eval's per-document records), `--overwrite` for eval and contamination,
and GSM8K few-shot contexts with `--fewshot-file` against lm-eval's own gsm8k task."""

import json
from pathlib import Path

import pytest
from tiny import build_tiny_model

from upstack.cli import main

VOCAB = 260  # the tiny byte-level tokenizer: 256 bytes + 4 specials

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("samples") / "tiny", "llama", num_hidden_layers=2,
                                vocab_size=VOCAB))


def _gsm8k_rows(n: int, start: int = 0) -> list[dict]:
    return [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
             "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
            for i in range(start, start + n)]


def _arc_rows(n: int) -> list[dict]:
    return [{"id": f"q{i}", "question": f"Which number is {i}?", "answerKey": "B",
             "choices": {"text": [str(i + 1), str(i), str(i + 2)], "label": ["A", "B", "C"]}} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _err(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_log_samples_writes_lm_eval_records(tiny_model, tmp_path):
    gsm = _write_jsonl(tmp_path / "gsm.jsonl", _gsm8k_rows(6))
    arc = _write_jsonl(tmp_path / "arc.jsonl", _arc_rows(5))
    out = tmp_path / "run" / "results.json"
    assert main(["eval", tiny_model, "--tasks", "gsm8k_local,arc_challenge_local", "--task-file", f"gsm8k_local={gsm}",
                 "--task-file", f"arc_challenge_local={arc}", "--num-fewshot", "0", "--limit", "3",
                 "--max-gen-toks", "8", "--output", str(out), "--log-samples", "--quiet"]) == 0
    res = json.loads(out.read_text())
    files = sorted(out.parent.glob("samples_*.jsonl"))
    assert [f.name.split("_20")[0] for f in files] == ["samples_arc_challenge_local", "samples_gsm8k_local"]
    assert set(res["samples"]) == {"gsm8k_local", "arc_challenge_local"}
    assert sorted(res["samples"].values()) == [str(f) for f in files]
    gsm_records = [json.loads(line) for line in Path(res["samples"]["gsm8k_local"]).read_text().splitlines()]
    # as lm-eval writes them: a record per document and filter (GSM8K scores under two answer extractions)
    assert sorted((r["doc_id"], r["filter"]) for r in gsm_records) == [
        (d, f) for d in range(3) for f in ("flexible-extract", "strict-match")]
    for rec in gsm_records:
        for key in ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                    "exact_match"):
            assert key in rec, key
        assert rec["target"] == rec["doc"]["answer"] == _gsm8k_rows(6)[rec["doc_id"]]["answer"]
        prompt = rec["arguments"]["gen_args_0"]["arg_0"]
        assert prompt.endswith(f"Question: {rec['doc']['question']}\nAnswer:")
        assert isinstance(rec["resps"][0][0], str)  # the generated text
    arc_records = [json.loads(line) for line in Path(res["samples"]["arc_challenge_local"]).read_text().splitlines()]
    assert len(arc_records) == 3
    for rec in arc_records:
        assert rec["target"] == "1"  # the gold choice's index ("B")
        assert len(rec["resps"]) == 3 and float(rec["resps"][0][0][0]) < 0  # a log-likelihood per choice (lm-eval writes it as text)
        assert rec["arguments"]["gen_args_1"]["arg_1"] == f" {rec['doc']['choices']['text'][1]}"
        assert "acc" in rec and "acc_norm" in rec
    # no leftovers of the temporary samples folder
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_log_samples_needs_output(tiny_model, tmp_path, capsys):
    gsm = _write_jsonl(tmp_path / "gsm.jsonl", _gsm8k_rows(3))
    err = _err(capsys, ["eval", tiny_model, "--tasks", "gsm8k_local", "--task-file", f"gsm8k_local={gsm}",
                        "--log-samples"])
    assert "--log-samples needs --output" in err


def test_eval_refuses_existing_output_without_overwrite(tiny_model, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("one two three four five six seven eight nine ten\n" * 5)
    out = tmp_path / "r.json"
    out.write_text("{}")
    err = _err(capsys, ["eval", tiny_model, "--perplexity", str(text), "--output", str(out)])
    assert err.strip().count("\n") == 0 and "already exists (pass --overwrite" in err
    assert out.read_text() == "{}"  # untouched, and no work done (no markdown table beside it)
    assert not out.with_suffix(".md").exists()
    assert main(["eval", tiny_model, "--perplexity", str(text), "--output", str(out), "--overwrite", "--quiet"]) == 0
    assert json.loads(out.read_text())["perplexity"]


def test_contamination_refuses_existing_output_without_overwrite(tiny_model, tmp_path, capsys):
    bench = _write_jsonl(tmp_path / "gsm.jsonl", _gsm8k_rows(3))
    out = tmp_path / "c.json"
    out.write_text("{}")
    argv = ["contamination", tiny_model, "--method", "min-k", "--benchmark", f"gsm8k={bench}", "--output", str(out)]
    err = _err(capsys, argv)
    assert err.strip().count("\n") == 0 and "already exists (pass --overwrite" in err and out.read_text() == "{}"
    assert main([*argv, "--overwrite", "--quiet"]) == 0
    assert json.loads(out.read_text())["benchmarks"]["gsm8k"]["examples"] == 3


def _contexts(include_path: Path, task_name: str, seed: int = 1234, shots: int = 5) -> list[str]:
    """Per-document contexts lm-eval builds for `task_name` (as simple_evaluate builds them: its fewshot seed)."""
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(include_path), include_defaults=False).load([task_name])["tasks"][task_name]
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=seed)
    task.build_all_requests(rank=0, world_size=1)
    return [inst.args[0] for inst in sorted(task.instances, key=lambda i: i.doc_id)]


def test_gsm8k_fewshot_file_contexts_equal_lm_eval_builtin(tmp_path):
    """With --fewshot-file the local task draws five examples from a separate train split, as lm-eval's own gsm8k
    does: the per-document prompts are identical. From one file it draws six and drops the scored one, so the
    prompts differ from the second document on (docs/evaluation.md)."""
    import lm_eval.tasks
    import yaml

    from upstack.evaluate.config import EvalConfig
    from upstack.evaluate.tasks.local import write_local_tasks

    LM_EVAL_TASKS = Path(lm_eval.tasks.__file__).parent
    train = _write_jsonl(tmp_path / "train.jsonl", _gsm8k_rows(40, start=100))
    test = _write_jsonl(tmp_path / "test.jsonl", _gsm8k_rows(8))
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    # lm-eval's own gsm8k task, every field as shipped, only its data read from the two local files
    (theirs / "gsm8k_files.yaml").write_text(yaml.safe_dump({
        "include": str(LM_EVAL_TASKS / "gsm8k" / "gsm8k.yaml"), "task": "gsm8k_files", "dataset_path": "json",
        "dataset_name": None, "dataset_kwargs": {"data_files": {"train": str(train), "test": str(test)}}}))
    builtin = _contexts(theirs, "gsm8k_files")
    assert len(builtin) == 8 and builtin[0].count("Question:") == 6

    def ours(fewshot_files: dict) -> list[str]:
        folder = tmp_path / f"ours{len(fewshot_files)}"
        folder.mkdir()
        cfg = EvalConfig(model="unused", tasks=["gsm8k_local"], task_files={"gsm8k_local": str(test)},
                         fewshot_files=fewshot_files)
        write_local_tasks(folder, "gsm8k_local", cfg)
        return _contexts(folder, "gsm8k_local")

    assert ours({"gsm8k_local": str(train)}) == builtin
    # one file: examples from the scored file itself, the scored document left out
    single = ours({})
    assert all(ctx.count(doc["question"]) == 1 for ctx, doc in zip(single, _gsm8k_rows(8)))
