"""report.md and results.json from a run folder built by hand: stage markers, metrics.jsonl, results files."""

from __future__ import annotations

import json
import types
from pathlib import Path

from upstack.report import MARKER, PLOT_INDEX, collect, write_report


def _stage(run: Path, name: str, stype: str, finished: str, config: dict | None = None, result=None,
           seconds: float = 1.5, files: dict | None = None) -> None:
    d = run / name
    d.mkdir(parents=True)
    (d / MARKER).write_text(json.dumps({"stage": name, "type": stype, "config": config or {}, "seconds": seconds,
                                        "finished": finished, "result": result}))
    for fname, content in (files or {}).items():
        (d / fname).write_text(content if isinstance(content, str) else json.dumps(content))


def make_run(run: Path) -> Path:
    _stage(run, "upscale", "upscale", "2024-01-01T00:00:01",
           files={"upstack.json": {"upscale": {"method": "dus", "source_num_hidden_layers": 4,
                                               "layer_map": [0, 1, 2, 1, 2, 3], "new_layers": []}}})
    metrics = [{"type": "train", "step": 1, "loss": 2.0}, {"type": "train", "step": 2, "loss": 1.5},
               {"type": "eval", "step": 2, "eval_loss": 1.75}, "not json"]
    _stage(run, "sft", "sft", "2024-01-01T00:00:02", seconds=10.0,
           files={"metrics.jsonl": "\n".join(m if isinstance(m, str) else json.dumps(m) for m in metrics) + "\n"})
    _stage(run, "clean", "decontaminate", "2024-01-01T00:00:03",
           result={"data": "/x/train.jsonl", "ngram": 13, "rows": 10, "removed": 2,
                   "benchmarks": {"gsm8k": {"rows_removed": 2, "examples": 5, "short_examples": 1}}})
    _stage(run, "eval_sft", "eval", "2024-01-01T00:00:04", config={"model": str(run / "sft")},
           files={"results.json": {"results": {"gsm8k_local": {"exact_match": 0.25, "exact_match_stderr": 0.1}},
                                   "h6": {"score": 0.5},
                                   "perplexity": {"/d/heldout.txt": {"perplexity": 12.5}}}})
    _stage(run, "eval_upscale", "eval", "2024-01-01T00:00:05", config={"model": str(run / "upscale")},
           files={"results.json": {"results": {"gsm8k_local": {"exact_match": 0.125}}}})
    _stage(run, "pref_sft", "eval", "2024-01-01T00:00:06", config={"model": str(run / "sft")},
           files={"results.json": {"preference": {"/d/pairs.jsonl": {"accuracy": 0.75, "pairs": 8}}}})
    _stage(run, "contamination", "contamination", "2024-01-01T00:00:07", config={"model": str(run / "sft")},
           files={"contamination.json": {"benchmarks": {"gsm8k": {"result": 0.0625}}}})
    (run / "not_a_stage").mkdir()
    return run


def test_collect_gathers_scores_by_model_in_stage_order(tmp_path):
    data = collect(make_run(tmp_path))
    assert list(data["stages"]) == ["upscale", "sft", "clean", "eval_sft", "eval_upscale", "pref_sft",
                                    "contamination"]
    assert list(data["models"]) == ["upscale", "sft"]
    assert data["models"]["upscale"] == {"gsm8k_local/exact_match": 0.125}
    sft = data["models"]["sft"]
    assert sft["gsm8k_local/exact_match"] == 0.25 and "gsm8k_local/exact_match_stderr" not in sft
    assert sft["h6"] == 0.5 and sft["perplexity/heldout.txt"] == 12.5
    assert sft["pref:preference/pairs.jsonl/accuracy"] == 0.75
    assert sft["contamination/gsm8k"] == 0.0625
    assert data["final_metrics"] == {"sft": {"step": 2, "loss": 1.5, "eval_loss": 1.75}}
    assert data["layer_maps"][0]["stage"] == "upscale" and data["layer_maps"][0]["layer_map"] == [0, 1, 2, 1, 2, 3]


def test_write_report_tables_and_results_json(tmp_path):
    run = make_run(tmp_path / "myrun")
    recipe = types.SimpleNamespace(
        stages={n: None for n in ("upscale", "sft", "clean", "eval_upscale", "eval_sft", "pref_sft", "contamination")},
        path=Path("/r/my.yaml"),
        raw={"description": "A test run.\n", "report": {"comparisons": [
            {"title": "Up vs SFT", "note": "a note", "models": ["upscale", "sft", "missing"]},
            {"title": "Nothing to show", "models": ["missing"]}]}})
    out = write_report(run, recipe)
    assert out == run / "report.md"
    md = out.read_text()
    assert md.startswith("# upstack run: myrun\n\nRecipe: `/r/my.yaml`\n\nA test run.\n")
    assert "## Scores by stage\n\n| metric | upscale | sft |\n|---|---:|---:|\n" in md
    assert "| gsm8k_local/exact_match | 0.125 | 0.25 |" in md
    assert "| h6 | - | 0.5 |" in md and "| contamination/gsm8k | - | 0.0625 |" in md
    assert "## Up vs SFT\n\na note\n\n| metric | upscale | sft |" in md and "Nothing to show" not in md
    assert "| clean | train.jsonl | 13 | 10 | 2 | gsm8k: 2 / 5 (1) |" in md
    assert "## Training (last logged values)\n\n| stage | loss | eval_loss | step |" in md
    assert "| sft | 1.5 | 1.75 | 2 |" in md
    assert "![plot_loss.png](plot_loss.png)" in md and "![plot_eval_loss.png](plot_eval_loss.png)" in md
    assert "Stage `upscale` (dus): 4 -> 6 layers." in md and "| 0-2 | 0-2 |" in md and "| 3-5 | 1-3 |" in md
    assert "| sft | sft | 10 | 2024-01-01T00:00:02 |" in md and "| total | | 19.0 | |" in md
    results = json.loads((run / "results.json").read_text())
    assert results == json.loads(json.dumps(collect(run, list(recipe.stages)), default=str))
    assert list(results["stages"])[:2] == ["upscale", "sft"] and results["run_dir"] == str(run)


def test_plot_index_keeps_unchanged_plots_and_redraws_missing_ones(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    index = json.loads((run / PLOT_INDEX).read_text())
    assert set(index) == {"plot_loss.png", "plot_eval_loss.png"}
    (run / "plot_loss.png").unlink()
    before = (run / "plot_eval_loss.png").stat().st_mtime_ns
    write_report(run)
    assert (run / "plot_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "plot_eval_loss.png").stat().st_mtime_ns == before
    assert json.loads((run / PLOT_INDEX).read_text()) == index


def test_empty_run_folder(tmp_path):
    md = write_report(tmp_path).read_text()
    assert "## Timings" in md and "| total | | 0.0 | |" in md and "Scores" not in md
    assert json.loads((tmp_path / "results.json").read_text())["models"] == {}
