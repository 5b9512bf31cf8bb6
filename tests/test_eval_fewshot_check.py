"""A local task whose file holds fewer rows than its few-shot count is refused before any model is loaded, in
one line naming the task, the shots, the rows found and the way out (lm-eval would stop mid-run with
`ValueError: Sample larger than population or is negative`)."""

import json

import pytest
from conftest import SHARED_DATA
from tiny import build_tiny_model

from upstack.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (task, shared file, leaderboard shots)
TASKS = [
    ("arc_challenge_local", "arc_challenge/ARC-Challenge-Dev.jsonl", 25),
    ("hellaswag_local", "hellaswag/hellaswag_val_sample500.jsonl", 10),
    ("mmlu_local", "mmlu/val/anatomy_val.csv", 5),
    ("winogrande_local", "winogrande/train_xs.jsonl", 5),
    ("gsm8k_local", "gsm8k/train_first500.jsonl", 5),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("eval") / "tiny", "llama", num_hidden_layers=2,
                                vocab_size=260))


@pytest.fixture
def no_model(monkeypatch):
    """The check comes before the model is loaded: loading it fails the test."""
    import upstack.evaluate.harness as harness

    def refuse(cfg):
        raise AssertionError("the model was loaded before the few-shot check")
    monkeypatch.setattr(harness, "load_lm", refuse)


def first_rows(src, dst, n):
    lines = [line for line in src.read_text(encoding="utf-8").splitlines(keepends=True) if line.strip()]
    dst.write_text("".join(lines[:n]), encoding="utf-8")
    return dst


def eval_argv(model, task, *extra):
    return ["eval", model, "--tasks", task, "--device", "cpu", "--limit", "1", "--quiet", *extra]


@pytest.mark.parametrize("task, rel, shots", TASKS, ids=[t for t, _, _ in TASKS])
def test_every_local_task_with_one_row_is_one_line_naming_shots_rows_and_the_way_out(
        tiny_model, tmp_path, capsys, no_model, task, rel, shots):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data samples not found at {SHARED_DATA}")
    one = first_rows(SHARED_DATA / rel, tmp_path / (SHARED_DATA / rel).name, 1)
    assert main(eval_argv(tiny_model, task, "--task-file", f"{task}={one}")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"{task}" in err and f"{shots}-shot needs {shots + 1} rows, found 1 row(s) in {one}" in err
    assert f"--num-fewshot {task}=0" in err and f"--fewshot-file {task}=FILE with at least {shots} rows" in err


def test_truthfulqa_is_0_shot_by_default_and_checked_when_shots_are_asked(tiny_model, tmp_path, capsys, no_model):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data samples not found at {SHARED_DATA}")
    one = first_rows(SHARED_DATA / "truthfulqa/mc_task_first400.jsonl", tmp_path / "mc.jsonl", 1)
    task = "truthfulqa_mc2_local"
    assert main(eval_argv(tiny_model, task, "--task-file", f"{task}={one}", "--num-fewshot", f"{task}=3")) == 2
    err = capsys.readouterr().err
    assert f"{task}: 3-shot needs 3 rows, found 1 row(s)" in err and f"--num-fewshot {task}=0 (or up to 1)" in err


def gsm8k_rows(path, n):
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"})
                            + "\n" for i in range(n)))
    return path


def test_the_bound_is_exact_scored_file_and_fewshot_file(tiny_model, tmp_path, capsys, monkeypatch):
    """5-shot from the scored file needs 6 rows (the scored row is left out); from a few-shot file, 5."""
    six, five, four = (gsm8k_rows(tmp_path / f"{n}.jsonl", n) for n in (6, 5, 4))
    t = "gsm8k_local"
    out = tmp_path / "r.json"
    assert main(eval_argv(tiny_model, t, "--task-file", f"{t}={six}", "--output", str(out))) == 0
    assert json.loads(out.read_text())["num_fewshot"][t] == 5
    assert main(eval_argv(tiny_model, t, "--task-file", f"{t}={five}", "--fewshot-file", f"{t}={five}")) == 2
    assert "5-shot needs 6 rows, found 5 row(s)" in capsys.readouterr().err  # the same file: scored row left out
    assert main(eval_argv(tiny_model, t, "--task-file", f"{t}={six}", "--fewshot-file", f"{t}={four}")) == 2
    err = capsys.readouterr().err
    assert f"{t}: 5-shot needs 5 rows, found 4 row(s) in the few-shot file {four}" in err
    assert f"--num-fewshot {t}=0 (or up to 4)" in err
    assert main(eval_argv(tiny_model, t, "--task-file", f"{t}={six}", "--fewshot-file", f"{t}={five}",
                          "--output", str(tmp_path / "r2.json"))) == 0


def test_the_way_out_runs(tiny_model, tmp_path):
    one = gsm8k_rows(tmp_path / "one.jsonl", 1)
    t = "gsm8k_local"
    out = tmp_path / "r.json"
    assert main(eval_argv(tiny_model, t, "--task-file", f"{t}={one}", "--num-fewshot", f"{t}=0",
                          "--output", str(out))) == 0
    assert json.loads(out.read_text())["n_samples"][t]["original"] == 1


def test_an_mmlu_folder_names_the_short_subject_and_counts_the_others(tiny_model, tmp_path, capsys, no_model):
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data samples not found at {SHARED_DATA}")
    for subject in ("anatomy", "astronomy", "virology"):
        (tmp_path / "mmlu/val").mkdir(parents=True, exist_ok=True)
        (tmp_path / "mmlu/dev").mkdir(parents=True, exist_ok=True)
        first_rows(SHARED_DATA / f"mmlu/val/{subject}_val.csv", tmp_path / f"mmlu/val/{subject}_val.csv", 3)
        first_rows(SHARED_DATA / f"mmlu/dev/{subject}_dev.csv", tmp_path / f"mmlu/dev/{subject}_dev.csv",
                   5 if subject == "anatomy" else 2)
    assert main(eval_argv(tiny_model, "mmlu_local", "--data-dir", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: mmlu_local_astronomy (mmlu_local): 5-shot needs 5 rows, found 2 row(s) in the "
                          "few-shot file ") and "(and 1 more subject(s) of mmlu_local)" in err
