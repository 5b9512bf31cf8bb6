"""Recipes: validation (all errors at once, with lines), references, skip-if-done, --from/--only, report."""

import json
from pathlib import Path

import pytest
from tiny import build_tiny_model

from upstack.cli import main
from upstack.errors import ConfigError
from upstack.pipeline import MARKER, load_recipe, run_recipe


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("m") / "src", "mistral", num_hidden_layers=4)


def write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_validation_reports_everything_with_lines(tmp_path, model):
    p = write(tmp_path, f"""\
name: bad
colour: blue
stages:
  up:
    type: upscale
    source: {model}
    m: two
    wings: 3
  loop_a:
    type: upscale
    source: loop_b
  loop_b:
    type: upscale
    source: loop_a
  missing:
    type: upscale
    source: ./does/not/exist
  what:
    type: teleport
""")
    with pytest.raises(ConfigError) as e:
        load_recipe(p, tmp_path / "run")
    msg = str(e.value)
    assert "line 2: unknown top-level key 'colour'" in msg
    assert "line 7:" in msg and "stage 'up'.m" in msg and "'two'" in msg
    assert "wings" in msg
    assert "cycle" in msg and "loop_a" in msg and "loop_b" in msg
    assert "./does/not/exist" in msg and "does not exist" in msg
    assert "line 18:" in msg and "teleport" in msg
    assert not (tmp_path / "run").exists()


def test_cli_reports_recipe_errors_exit_2(tmp_path, capsys):
    p = write(tmp_path, "stages:\n  up:\n    type: upscale\n    sorce: x\n")
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "sorce" in err and "missing required option 'source'" in err


def test_run_skip_if_done_from_only_and_report(tmp_path, model, capsys):
    p = write(tmp_path, f"""\
name: chain
stages:
  upscale:
    source: {model}
    m: 1
  again:
    type: upscale
    source: upscale
    method: interleave
    every: 3
""")
    run_dir = tmp_path / "run"
    recipe = load_recipe(p, run_dir)
    assert list(recipe.stages) == ["upscale", "again"]
    assert recipe.stages["again"].resolved["source"] == str(run_dir / "upscale")
    logs = []
    summary = run_recipe(recipe, quiet=True, log=logs.append)
    assert summary["stages"] == {"upscale": "ran", "again": "ran"}
    cfg = json.loads((run_dir / "again" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 8  # 4 -> 6 (dus m=1) -> 8 (a copy after every 3)
    marker = json.loads((run_dir / "upscale" / MARKER).read_text())
    assert marker["config"]["m"] == 1 and marker["type"] == "upscale"
    assert (run_dir / "report.md").is_file() and (run_dir / "results.json").is_file()
    report = (run_dir / "report.md").read_text()
    assert "Layer map" in report and "| 3-5 | 1-3 |" in report

    # unchanged: everything skipped
    summary = run_recipe(load_recipe(p, run_dir), quiet=True, log=logs.append)
    assert summary["stages"] == {"upscale": "skipped", "again": "skipped"}
    # --only re-runs one stage; --from re-runs a stage and what follows
    assert run_recipe(load_recipe(p, run_dir), only="again", quiet=True, log=logs.append)["stages"] == {"again": "ran"}
    assert run_recipe(load_recipe(p, run_dir), from_stage="upscale", quiet=True,
                      log=logs.append)["stages"] == {"upscale": "ran", "again": "ran"}
    # a changed option re-runs that stage and, since its output changed, the stage after it
    p.write_text(p.read_text().replace("every: 3", "every: 2"))
    assert run_recipe(load_recipe(p, run_dir), quiet=True, log=logs.append)["stages"] == {
        "upscale": "skipped", "again": "ran"}
    assert json.loads((run_dir / "again" / "config.json").read_text())["num_hidden_layers"] == 9


def test_failed_stage_keeps_earlier_outputs_and_resumes(tmp_path, model):
    p = write(tmp_path, f"""\
stages:
  upscale:
    source: {model}
    m: 1
  broken:
    type: upscale
    source: upscale
    layers: "0-9"
""")
    run_dir = tmp_path / "run"
    with pytest.raises(Exception, match="out of range"):
        run_recipe(load_recipe(p, run_dir), quiet=True, log=lambda m: None)
    assert (run_dir / "upscale" / MARKER).is_file()
    assert not (run_dir / "broken").exists()
    p.write_text(p.read_text().replace('"0-9"', '"0-5"'))
    summary = run_recipe(load_recipe(p, run_dir), quiet=True, log=lambda m: None)
    assert summary["stages"] == {"upscale": "skipped", "broken": "ran"}


def test_dry_run_plan(tmp_path, model, capsys):
    p = write(tmp_path, f"stages:\n  upscale:\n    source: {model}\n    m: 1\n")
    assert main(["run", str(p), "--out", str(tmp_path / "run"), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    st = plan["stages"][0]
    assert st["stage"] == "upscale" and st["num_hidden_layers"] == 6 and not st["done"]
    assert not (tmp_path / "run").exists()


def test_report_redraws_a_plot_only_when_its_curves_change(tmp_path):
    import os

    from upstack.report import write_report

    stage = tmp_path / "dpo"
    stage.mkdir()
    (stage / "upstack_stage.json").write_text(json.dumps({"type": "dpo", "config": {}, "seconds": 1.0}))
    rows = [{"type": "train", "step": s, "loss": 1.0 / s, "rewards/margin": 0.1 * s} for s in (1, 2, 3)]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(tmp_path)
    pngs = {n: tmp_path / f"plot_{n}.png" for n in ("dpo_loss", "rewards_margin")}  # DPO loss: its own plot
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs.values())
    assert "![plot_rewards_margin.png](plot_rewards_margin.png)" in (tmp_path / "report.md").read_text()
    for p in pngs.values():
        os.utime(p, ns=(10**9, 10**9))
    write_report(tmp_path)  # same curves: not drawn again
    assert all(p.stat().st_mtime_ns == 10**9 for p in pngs.values())
    with (stage / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"type": "train", "step": 4, "loss": 0.2}) + "\n")
    write_report(tmp_path)  # the loss curve changed, the margin curve did not
    assert pngs["dpo_loss"].stat().st_mtime_ns != 10**9
    assert pngs["rewards_margin"].stat().st_mtime_ns == 10**9


def test_named_benchmark_paths_decontaminate_chain_and_dry_run_status(tmp_path, capsys):
    """`NAME=<stage>/...` options resolve (and make a dependency); a decontaminate stage's kept rows feed a
    later stage and its counts reach report.md; --dry-run marks the stages after a pending one pending."""
    src = tmp_path / "src"
    src.mkdir()
    bench = "the quick brown fox jumps over the lazy dog near the river bank at dawn"
    (src / "bench.jsonl").write_text(json.dumps({"question": bench, "answer": "yes"}) + "\n")
    (src / "train.jsonl").write_text(json.dumps({"text": "an unrelated row about merging models"}) + "\n"
                                     + json.dumps({"text": "copied: " + bench}) + "\n")
    p = write(tmp_path, f"""\
name: decon
stages:
  copy:
    type: decontaminate
    data: {src / 'bench.jsonl'}
    against: [{src / 'train.jsonl'}]
    ngram: 40
  clean:
    type: decontaminate
    data: {src / 'train.jsonl'}
    against: [mybench=copy/clean.jsonl]
  again:
    type: decontaminate
    data: clean/clean.jsonl
    against: [mybench=copy/clean.jsonl]
""")
    run_dir = tmp_path / "run"
    recipe = load_recipe(p, run_dir)
    assert recipe.stages["clean"].deps == ["copy"]
    assert recipe.stages["clean"].resolved["against"] == [f"mybench={run_dir / 'copy' / 'clean.jsonl'}"]
    assert run_recipe(recipe, quiet=True, log=lambda m: None)["stages"] == {
        "copy": "ran", "clean": "ran", "again": "ran"}
    kept = [json.loads(x)["text"] for x in (run_dir / "clean" / "clean.jsonl").read_text().splitlines()]
    assert kept == ["an unrelated row about merging models"]
    again = json.loads((run_dir / "again" / MARKER).read_text())["result"]
    assert again["rows"] == 1 and again["removed"] == 0
    report = (run_dir / "report.md").read_text()
    assert "## Decontamination" in report
    assert "| clean | train.jsonl | 13 | 2 | 1 | mybench: 1 / 1 |" in report
    # change the first stage: --dry-run shows it and everything after it as to run
    p.write_text(p.read_text().replace("ngram: 40", "ngram: 30"))
    capsys.readouterr()
    assert main(["run", str(p), "--out", str(run_dir), "--dry-run", "--json"]) == 0
    plan = {s["stage"]: s["done"] for s in json.loads(capsys.readouterr().out)["stages"]}
    assert plan == {"copy": False, "clean": False, "again": False}
