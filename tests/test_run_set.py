"""`upstack run RECIPE --set STAGE.KEY=VALUE`: one option from the command line, after --profile, checked as
the file's options are (types, the stage's own value checks, inputs), and a misspelled stage or option is
one line with a "did you mean"."""

import json

import pytest

from upstack.errors import ConfigError
from upstack.pipeline import load_recipe

RECIPE = "recipes/tiny-solar.yaml"  # built in: found from any folder


def _opts(recipe, stage):
    return recipe.stages[stage].resolved


def test_values_are_yaml_scalars_and_flow_values():
    r = load_recipe(RECIPE, "/tmp/r", sets=["sft_math.max_steps=10", "dpo.beta=0.2", "sft_nomath.lora=true",
                                            "pretrain.data=[data/pretrain.jsonl, data/sft_math.jsonl]",
                                            "merge_slerp.parameters={t: 0.25}"])
    assert _opts(r, "sft_math")["max_steps"] == 10
    assert _opts(r, "dpo")["beta"] == 0.2
    assert _opts(r, "sft_nomath")["lora"] is True
    assert _opts(r, "pretrain")["data"] == ["/tmp/r/data/pretrain.jsonl", "/tmp/r/data/sft_math.jsonl"]
    assert _opts(r, "merge_slerp")["parameters"] == {"t": 0.25}
    # untouched options keep the file's values
    assert _opts(r, "sft_math")["learning_rate"] == 1.0e-3


def test_nested_keys_keep_their_siblings():
    r = load_recipe(RECIPE, "/tmp/r", sets=["base.train.max_steps=5"])
    train = _opts(r, "base")["train"]
    assert train["max_steps"] == 5 and train["learning_rate"] == 3.0e-3 and train["max_length"] == 128


def test_applied_after_the_profile():
    r = load_recipe(RECIPE, "/tmp/r", profile="quick", sets=["pretrain.max_steps=3"])
    assert _opts(r, "pretrain")["max_steps"] == 3
    assert _opts(r, "pretrain")["max_length"] == 96  # the profile's value stays
    r = load_recipe(RECIPE, "/tmp/r", profile="quick", sets=["base.train.max_steps=4"])
    assert _opts(r, "base")["train"]["max_steps"] == 4 and _opts(r, "base")["hidden_size"] == 64


def test_eval_stages_of_evaluate_blocks_can_be_set():
    r = load_recipe(RECIPE, "/tmp/r", sets=["eval_dpo.limit=5"])
    assert _opts(r, "eval_dpo")["limit"] == 5 and _opts(r, "eval_sft_math")["limit"] == 100


@pytest.mark.parametrize("item, message", [
    ("sfft_math.max_steps=1", "--set sfft_math.max_steps=1: no stage 'sfft_math' (did you mean sft_math?)"),
    ("sft_math.max_step=1", "--set sft_math.max_step=1: stage 'sft_math' (sft) has no option 'max_step' "
                            "(did you mean max_steps?)"),
    ("base.train.max_step=5", "--set base.train.max_step=5: stage 'base' (base): train has no option 'max_step' "
                              "(did you mean max_steps?)"),
    ("sft_math.max_steps=abc", "--set sft_math.max_steps=abc: stage 'sft_math'.max_steps: 'abc' is not a valid"),
    ("dpo.beta=-1", "--set dpo.beta=-1: stage 'dpo': beta: must be > 0"),
    ("base.train.learning_rate=-1", "--set base.train.learning_rate=-1: stage 'base': base.train.learning_rate"),
    ("pretrain.data=[a.jsonl]", "--set pretrain.data=[a.jsonl]: stage 'pretrain': data: 'a.jsonl' does not exist"),
    ("merge_avg.method=lineer", "--set merge_avg.method=lineer: stage 'merge_avg'"),
    ("merge_avg.models.0=x", "--set merge_avg.models.0=x: merge_avg.models is a list, not a mapping"),
    ("sft_math", "--set sft_math: expected STAGE.KEY=VALUE"),
    ("sft_math.max_steps=[1", "--set sft_math.max_steps=[1: the value is not valid YAML"),
])
def test_mistakes_are_reported_like_the_files(item, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE, "/tmp/r", sets=[item])
    assert message in str(e.value), str(e.value)
    assert "line --set" not in str(e.value)


def test_all_problems_together_with_the_files():
    with pytest.raises(ConfigError) as e:
        load_recipe(RECIPE, "/tmp/r", sets=["sft_math.max_step=1", "dpo.beta=-1"])
    assert "2 problem(s)" in str(e.value)


def test_cli(capsys, monkeypatch, tmp_path):
    from upstack.cli import main

    monkeypatch.chdir(tmp_path)

    def plan(*sets):
        assert main(["run", RECIPE, *sets, "--dry-run", "--json"]) == 0
        return {s["stage"]: s for s in json.loads(capsys.readouterr().out)["stages"]}

    # The plan the CLI prints follows the --set values: sft_math trains LoRA adapters, dpo a smaller batch.
    before = plan()
    after = plan("--set", "sft_math.lora=true", "--set", "dpo.batch_size=1")
    assert before["sft_math"]["train_method"] == "full" and after["sft_math"]["train_method"] == "lora"
    assert after["sft_math"]["train_memory_bytes"] == before["sft_math"]["memory"]["lora"]["total"]
    assert after["dpo"]["train_memory_bytes"] < before["dpo"]["train_memory_bytes"]
    assert {k: v for k, v in after.items() if k not in ("sft_math", "dpo")} == \
           {k: v for k, v in before.items() if k not in ("sft_math", "dpo")}
    assert main(["run", RECIPE, "--set", "sft_mth.max_steps=7", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "did you mean sft_math?" in err and "Traceback" not in err
