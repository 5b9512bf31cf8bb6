"""A recipe's inputs named once: `vars:` with `${NAME}` in any stage or evaluate option, `--set vars.NAME=VALUE`,
`wheel:DIST/PATH` (a file an installed package ships); mistakes are one problem each, before anything runs."""

import pytest

from upstack.errors import ConfigError
from upstack.pipeline import load_recipe
from upstack.pipeline.variables import wheel_file


def _write(tmp_path, text):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text("{}")
    path = tmp_path / "r.yaml"
    path.write_text(text.replace("DIR", str(tmp_path)))
    return path


RECIPE = """
name: v
vars:
  model: DIR/m
  text: [DIR/a.jsonl]
  steps: 3
stages:
  pretrain:
    model: ${model}
    data: ${text}
    eval_data: ["${text_one}"]
    max_steps: ${steps}
    eval_fraction: 0
evaluate:
  models: [pretrain]
  perplexity: ["${text_one}"]
"""


def test_whole_values_keep_their_type_and_text_is_substituted(tmp_path):
    path = _write(tmp_path, RECIPE.replace("steps: 3", "steps: 3\n  text_one: DIR/a.jsonl"))
    r = load_recipe(path, tmp_path / "run")
    opts = r.stages["pretrain"].resolved
    assert opts["model"] == f"{tmp_path}/m"
    assert opts["data"] == [f"{tmp_path}/a.jsonl"]          # a list stays a list
    assert opts["max_steps"] == 3                           # an int stays an int
    assert r.stages["eval_pretrain"].resolved["perplexity"] == [f"{tmp_path}/a.jsonl"]


def test_set_vars_overrides_after_the_file(tmp_path):
    path = _write(tmp_path, RECIPE.replace("steps: 3", "steps: 3\n  text_one: DIR/a.jsonl"))
    r = load_recipe(path, tmp_path / "run", sets=[f"vars.text=[{tmp_path}/b.jsonl]", "vars.steps=7",
                                                  "pretrain.learning_rate=0.01"])
    opts = r.stages["pretrain"].resolved
    assert opts["data"] == [f"{tmp_path}/b.jsonl"] and opts["max_steps"] == 7 and opts["learning_rate"] == 0.01


def test_unknown_var_and_unknown_set_var_are_problems(tmp_path):
    path = _write(tmp_path, RECIPE)  # ${text_one} is not defined
    with pytest.raises(ConfigError) as e:
        load_recipe(path, tmp_path / "run", sets=["vars.stesp=2"])
    msg = str(e.value)
    assert "line 11: ${text_one}: no such var (vars: model, text, steps)" in msg
    assert "--set vars.stesp=2: the recipe has no var 'stesp' (did you mean steps?)" in msg


def test_wheel_file_found_in_an_installed_distribution():
    path = wheel_file("wheel:pyyaml/yaml/__init__.py")
    assert path.endswith("yaml/__init__.py")
    import yaml
    assert open(path).read() == open(yaml.__file__).read()


@pytest.mark.parametrize("value, message", [
    ("wheel:no-such-dist-xyz/a.gguf", "the package 'no-such-dist-xyz' is not installed"),
    ("wheel:pyyaml/yaml/no_such_file.gguf", "the installed package 'pyyaml' has no file 'yaml/no_such_file.gguf'"),
    ("wheel:pyyaml", "expected wheel:DISTRIBUTION/PATH"),
])
def test_wheel_file_mistakes(value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        wheel_file(value)


def test_a_missing_wheel_in_vars_is_a_recipe_problem(tmp_path):
    path = _write(tmp_path, RECIPE.replace("model: DIR/m", "model: wheel:no-such-dist-xyz/x.gguf")
                  .replace("steps: 3", "steps: 3\n  text_one: DIR/a.jsonl"))
    with pytest.raises(ConfigError, match=r"line 4: vars: model: 'wheel:no-such-dist-xyz/x.gguf': the package"):
        load_recipe(path, tmp_path / "run")


def test_the_real_recipe_names_its_inputs_once():
    """smollm2-solar's data files all come from `vars:`: one --set moves every stage that reads them."""
    with pytest.raises(ConfigError) as e:
        load_recipe("recipes/smollm2-solar.yaml", "/tmp/r", sets=["vars.model=/nonexistent/x.gguf",
                                                                  "vars.benchmarks=/nonexistent"])
    msg = str(e.value)
    assert "no such file (a GGUF model source)" in msg and "/nonexistent/gsm8k/train_first500.jsonl" in msg
