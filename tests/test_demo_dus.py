"""The DUS comparison recipe (`recipes/tiny-dus.yaml --profile quick`) end to end: every up-scaling
method builds the layer count it promises, interleaving preserves the base's function exactly, and every
model is trained on the same extra tokens."""

import json
import os

import pytest

from upstack.cli import main


@pytest.fixture(scope="module")
def dus_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dus")
    here = os.getcwd()
    os.chdir(root)  # a folder without recipes/: the built-in recipe is found by name
    try:
        assert main(["run", "recipes/tiny-dus.yaml", "--profile", "quick", "--out", "run", "--quiet"]) == 0
    finally:
        os.chdir(here)
    return root / "run"


@pytest.mark.slow
def test_tiny_dus_quick(dus_run):
    results = json.loads((dus_run / "results.json").read_text())
    models = results["models"]
    layers = {m: json.loads((dus_run / m / "config.json").read_text())["num_hidden_layers"]
              for m in ("base", "dus", "stack", "interleaved", "dus_trained", "stack_trained",
                        "interleaved_trained", "base_trained")}
    assert layers == {"base": 8, "dus": 12, "stack": 16, "interleaved": 12, "dus_trained": 12,
                      "stack_trained": 16, "interleaved_trained": 12, "base_trained": 8}
    ppl = {m: v["perplexity/heldout.txt"] for m, v in models.items()}
    # zero-initialised inserted blocks: the same function as the base before training ...
    assert ppl["interleaved"] == pytest.approx(ppl["base"], rel=1e-4)
    # ... while DUS and stacking change it (the seam), until continued pretraining recovers
    assert ppl["dus"] > ppl["base"] * 1.001 and ppl["stack"] > ppl["base"] * 1.001
    assert ppl["dus_trained"] < ppl["dus"]
    # every trained model saw the same tokens
    tokens = {m: [json.loads(x) for x in (dus_run / m / "metrics.jsonl").read_text().splitlines()
                  if '"type": "train"' in x][-1]["tokens"]
              for m in ("dus_trained", "stack_trained", "interleaved_trained", "base_trained")}
    assert len(set(tokens.values())) == 1, tokens
    report = (dus_run / "report.md").read_text()
    assert "## After the same extra training tokens" in report
