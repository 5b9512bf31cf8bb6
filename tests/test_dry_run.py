"""`upstack run RECIPE --dry-run` plans a recipe whose input files are not there yet (the paper's recipe before
any download): the whole plan and memory table, then the missing inputs as what must exist before the real
run (exit 2); the real run refuses them before any stage starts."""

import json

import pytest

from upstack.cli import main
from upstack.errors import ConfigError
from upstack.pipeline import BUILTIN_RECIPES, load_recipe, run_recipe

PAPER = BUILTIN_RECIPES / "solar-10.7b.yaml"
MISSING = ["./data/metamath_math.jsonl", *(f"./benchmarks/{b}" for b in
                                           ("arc_challenge", "hellaswag", "mmlu", "truthfulqa", "winogrande", "gsm8k"))]


def test_paper_recipe_dry_run_in_an_empty_folder_prints_the_plan_then_the_missing_inputs(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(PAPER), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    upscale = next(line for line in out.splitlines() if line.startswith("upscale "))
    assert upscale.split()[3:5] == ["48", "10,731,524,096"]  # layers, parameters: SOLAR-10.7B
    assert "training memory per process" in out and out.count(" GB (") >= 12  # the memory table
    assert err.startswith("error: ") and "7 input(s) to provide before the real run" in err
    assert all(f"{p!r} does not exist" in err for p in MISSING)
    assert len(err.strip().splitlines()) == 1 + 7 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # planned, nothing written


def test_paper_recipe_dry_run_json_lists_the_missing_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(PAPER), "--dry-run", "--json"]) == 2
    plan = json.loads(capsys.readouterr().out)
    rows = {r["stage"]: r for r in plan["stages"]}
    assert rows["upscale"]["num_hidden_layers"] == 48 and rows["upscale"]["num_parameters"] == 10_731_524_096
    assert len(plan["missing_inputs"]) == 7
    assert [m for p in MISSING for m in plan["missing_inputs"] if repr(p) in m] == plan["missing_inputs"]


def test_the_real_run_refuses_missing_inputs_before_any_stage(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(PAPER), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "7 problem(s)" in err and all(f"{p!r} does not exist" in err for p in MISSING)
    assert not (tmp_path / "run").exists()
    # a recipe loaded for a dry run (missing_ok) is refused by run_recipe too
    recipe = load_recipe(PAPER, tmp_path / "run", missing_ok=True)
    assert len(recipe.missing) == 7
    with pytest.raises(ConfigError, match="7 problem"):
        run_recipe(recipe, quiet=True)
    assert not (tmp_path / "run").exists()


def test_dry_run_with_missing_inputs_still_fails_on_any_other_problem(tmp_path, monkeypatch, capsys):
    """A missing file is planned around only when it is the sole kind of problem: a wrong value with it
    reports both, as the real run does, and prints no plan."""
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "r.yaml"
    p.write_text("stages:\n  upscale:\n    source: mistralai/Mistral-7B-v0.1\n    m: 8\n"
                 "  sft:\n    model: upscale\n    data: [./missing.jsonl]\n    learning_rate: -1\n")
    assert main(["run", str(p), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "2 problem(s)" in err and "learning_rate" in err and "missing.jsonl" in err


def test_dry_run_with_every_input_present_exits_0(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/metamath_math.jsonl").write_text("")
    for p in MISSING[1:]:
        (tmp_path / p).mkdir(parents=True)
    assert main(["run", str(PAPER), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "10,731,524,096" in out and "error" not in err


@pytest.mark.parametrize("flag, typo, close", [("--only", "eval_dpp", "eval_dpo"), ("--from", "sft_mth", "sft_math")])
@pytest.mark.parametrize("dry", [True, False])
def test_a_misspelled_stage_in_only_or_from_is_refused_with_and_without_dry_run(tmp_path, capsys, flag, typo,
                                                                                 close, dry):
    run_dir = tmp_path / "run"
    argv = ["run", "recipes/tiny-solar.yaml", "--out", str(run_dir), flag, typo] + (["--dry-run"] if dry else [])
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no plan printed for a command that names no stage of the recipe
    assert err.startswith(f"error: {flag} {typo!r}: no such stage (did you mean {close}? ")
    assert len(err.strip().splitlines()) == 1 and not run_dir.exists()


def test_dry_run_with_a_real_stage_in_only_prints_the_plan(tmp_path, capsys):
    assert main(["run", "recipes/tiny-solar.yaml", "--out", str(tmp_path / "run"), "--only", "eval_dpo",
                 "--dry-run"]) == 0
    assert "eval_dpo" in capsys.readouterr().out
