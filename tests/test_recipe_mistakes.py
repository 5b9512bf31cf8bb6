"""Recipe mistakes that once passed --dry-run and failed only when their stage ran are caught before the first
stage runs, all at once, with line numbers and a "did you mean"."""

import pytest
from tiny import build_tiny_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "m", "llama", num_hidden_layers=2)


def test_every_mistake_is_reported_before_anything_runs(tmp_path, model, monkeypatch, capsys):
    from upstack.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "sft.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    p = tmp_path / "r.yaml"
    p.write_text(f"""\
name: mistakes
stages:
  upscale:
    source: {model}
    m: 1
  sft:
    model: upscale
    data: [{data}]
  dpo:
    model: sfft
    data: [{tmp_path / 'missing.jsonl'}]
  lora:
    type: sft
    model: upscale
    data: [{data}]
    lora: true
    adapter_only: true
  merged:
    type: merge
    models: [sft, lora]
    method: lineer
""")
    assert main(["run", str(p), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "line 10: stage 'dpo': input model='sfft' is no stage of this recipe and no existing folder " \
           "(did you mean sft?)" in err
    assert "missing.jsonl' does not exist and no stage makes it" in err
    assert "stage 'lora' writes only an adapter (adapter_only: true)" in err
    assert "lineer" in err and "line 21" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run").exists()


def test_an_unknown_name_online_is_a_warning(tmp_path, model, monkeypatch, caplog):
    from upstack.pipeline import load_recipe

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    p = tmp_path / "r.yaml"
    p.write_text(f"stages:\n  upscale:\n    source: {model}\n  again:\n    type: upscale\n    source: gpt2\n")
    load_recipe(p, tmp_path / "run")  # gpt2 may be a hub id: a warning, not an error
    assert "source='gpt2' is no stage of this recipe" in caplog.text


def test_only_with_a_misspelled_stage(tmp_path, model, capsys):
    from upstack.cli import main

    p = tmp_path / "r.yaml"
    p.write_text(f"stages:\n  upscale:\n    source: {model}\n    m: 1\n")
    assert main(["run", str(p), "--only", "upscael", "--out", str(tmp_path / "run")]) == 2
    assert "did you mean upscale?" in capsys.readouterr().err
    assert not (tmp_path / "run" / "upscale").exists()


def test_a_misspelled_local_task_fails_at_load(tmp_path, model):
    from upstack.errors import ConfigError
    from upstack.pipeline import load_recipe

    p = tmp_path / "r.yaml"
    p.write_text(f"stages:\n  ev:\n    type: eval\n    model: {model}\n    tasks: [gsm8k_lokal]\n")
    with pytest.raises(ConfigError, match=r"unknown task gsm8k_lokal \(did you mean gsm8k_local\?\)"):
        load_recipe(p, tmp_path / "run")
    p.write_text(f"stages:\n  ev:\n    type: eval\n    model: {model}\n    tasks: [gsm8k, arc_challenge]\n")
    load_recipe(p, tmp_path / "run")  # lm-eval's own task names pass
