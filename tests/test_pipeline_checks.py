"""Every stage's values are checked when the recipe is loaded: a bad value in the last stage fails before
the first stage runs (`upstack run` and `--dry-run` alike), with the line of the option."""

import json
from pathlib import Path

import pytest

from upstack.cli import main
from upstack.errors import ConfigError
from upstack.pipeline import load_recipe


@pytest.fixture()
def files(tmp_path) -> Path:
    (tmp_path / "bench.jsonl").write_text(json.dumps({"question": "two plus two", "answer": "4"}) + "\n")
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "a training row"}) + "\n")
    (tmp_path / "model").mkdir()
    return tmp_path


def recipe(files: Path, last: str) -> Path:
    """A decontaminate stage (which would run at once and write its folder), then `last`."""
    p = files / "r.yaml"
    p.write_text(f"""\
name: checks
stages:
  clean:
    type: decontaminate
    data: {files / 'train.jsonl'}
    against: [{files / 'bench.jsonl'}]
{last}""")
    return p


SFT = """\
  sft:
    model: ./model
    data: [clean/clean.jsonl]
    max_steps: 3
    learning_rate: -1
"""  # learning_rate on line 11
MERGE = """\
  merged:
    type: merge
    models: [{model: ./model}, {model: ./model}]
    method: lineer
"""  # method on line 10


@pytest.mark.parametrize("last, line, words", [
    (SFT, 11, ["stage 'sft'", "learning_rate: must be > 0, got -1"]),
    (MERGE, 10, ["stage 'merged'", "unknown merge method 'lineer'"]),
])
def test_bad_value_in_last_stage_fails_before_any_stage_runs(files, monkeypatch, capsys, last, line, words):
    monkeypatch.chdir(files)
    p = recipe(files, last)
    run_dir = files / "run"
    with pytest.raises(ConfigError) as e:
        load_recipe(p, run_dir)
    msg = str(e.value)
    assert "1 problem(s)" in msg and f"line {line}: " in msg and all(w in msg for w in words)
    for extra in ([], ["--dry-run"]):
        assert main(["run", str(p), "--out", str(run_dir), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and err.count("error:") == 1 and f"line {line}: " in err
        assert not run_dir.exists()  # not even the first stage's folder


def test_all_stages_problems_reported_together(files, monkeypatch):
    monkeypatch.chdir(files)
    p = recipe(files, SFT + MERGE.replace("./model}, {model: ./model", "sft}, {model: sft"))
    with pytest.raises(ConfigError) as e:
        load_recipe(p, files / "run")
    msg = str(e.value)
    assert "2 problem(s)" in msg
    assert "line 11: stage 'sft': learning_rate" in msg and "line 15: stage 'merged': unknown merge method" in msg


def test_several_problems_of_one_stage_each_on_their_line(files, monkeypatch):
    monkeypatch.chdir(files)
    p = recipe(files, SFT + "    warmup_steps: -5\n")
    msg = str(pytest.raises(ConfigError, load_recipe, p, files / "run").value)
    assert "line 11: stage 'sft': learning_rate" in msg and "line 12: stage 'sft': warmup_steps: must be >= 0" in msg


BASE = """\
name: b
stages:
  base:
    tokenizer: tok
    data: [corpus.jsonl]
    hidden_size: 64
    train:
      max_steps: 10
      {bad}
"""


@pytest.mark.parametrize("bad, words", [
    ("lerning_rate: 0.1", ["base.train: unknown option(s) lerning_rate"]),
    ("batch_size: two", ["base.train.batch_size", "'two'"]),
    ("learning_rate: -1", ["base.train.learning_rate: must be > 0"]),
    ("out: elsewhere", ["base.train: out is set by the base stage"]),
])
def test_base_train_options_are_checked_at_load(tmp_path, bad, words):
    p = tmp_path / "r.yaml"
    p.write_text(BASE.format(bad=bad))
    msg = str(pytest.raises(ConfigError, load_recipe, p, tmp_path / "run").value)
    assert "stage 'base'" in msg and all(w in msg for w in words) and "base.train: base.train" not in msg, msg
    assert "line 9: " in msg or "line 7: " in msg  # the option's line, or the `train:` line for unknown keys


def test_good_base_train_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text('{"text": "a"}\n')  # inputs must exist (or be made by a stage)
    p = tmp_path / "r.yaml"
    p.write_text(BASE.format(bad="learning_rate: 0.01"))
    assert load_recipe(p, tmp_path / "run").stages["base"].resolved["train"]["learning_rate"] == 0.01
