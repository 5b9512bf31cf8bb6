"""report.md and results.json from a run folder built by hand: stage markers, metrics.jsonl, results files."""

from __future__ import annotations

import json
import types
from pathlib import Path

from upstack.report import MARKER, collect, write_report
from upstack.report_plots import PLOT_INDEX


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
    _stage(run, "sft", "sft", "2024-01-01T00:00:02", seconds=10.0, config={"model": str(run / "upscale")},
           files={"metrics.jsonl": "\n".join(m if isinstance(m, str) else json.dumps(m) for m in metrics) + "\n"})
    _stage(run, "clean", "decontaminate", "2024-01-01T00:00:03",
           result={"data": "/x/train.jsonl", "ngram": 13, "rows": 10, "removed": 2,
                   "benchmarks": {"gsm8k": {"rows_removed": 2, "examples": 5, "short_examples": 1}}})
    _stage(run, "eval_sft", "eval", "2024-01-01T00:00:04", config={"model": str(run / "sft")},
           files={"results.json": {"results": {"gsm8k_local": {"exact_match,strict-match": 0.25,
                                                               "exact_match_stderr,strict-match": 0.1}},
                                   "n_samples": {"gsm8k_local": {"original": 40, "effective": 20}},
                                   "h6": {"score": 0.5},
                                   "perplexity": {"/d/heldout.txt": {"perplexity": 12.5, "documents": 7}}}})
    _stage(run, "eval_upscale", "eval", "2024-01-01T00:00:05", config={"model": str(run / "upscale")},
           files={"results.json": {"results": {"gsm8k_local": {"exact_match,strict-match": 0.125,
                                                               "exact_match_stderr,strict-match": 0.08}},
                                   "n_samples": {"gsm8k_local": {"original": 40, "effective": 20}},
                                   "perplexity": {"/d/heldout.txt": {"perplexity": 20.0, "documents": 7}}}})
    _stage(run, "pref_sft", "eval", "2024-01-01T00:00:06", config={"model": str(run / "sft"), "preference_group": "kind"},
           files={"results.json": {"preference": {"/d/pairs.jsonl": {
               "accuracy": 0.75, "pairs": 8, "scored": 8,
               "groups": {"operation": {"accuracy": 0.5, "scored": 4}}}}}})
    _stage(run, "contamination", "contamination", "2024-01-01T00:00:07", config={"model": str(run / "sft")},
           files={"contamination.json": {"method": "neighbours", "reference": str(run / "upscale"),
                                         "config": {"threshold": 0.1},
                                         "benchmarks": {"gsm8k": {"result": 0.0625, "examples": 16, "available": 50,
                                                                  "neighbours": 10, "verdict": "clean"}}}})
    (run / "not_a_stage").mkdir()
    return run


def test_collect_gathers_scores_by_model_in_stage_order(tmp_path):
    data = collect(make_run(tmp_path))
    assert list(data["stages"]) == ["upscale", "sft", "clean", "eval_sft", "eval_upscale", "pref_sft",
                                    "contamination"]
    assert list(data["models"]) == ["upscale", "sft"]
    assert data["models"]["upscale"] == {"gsm8k_local/exact_match,strict-match": 0.125,
                                         "perplexity/heldout.txt": 20.0}
    sft = data["models"]["sft"]
    assert sft["gsm8k_local/exact_match,strict-match"] == 0.25 and not any("stderr" in k for k in sft)
    assert sft["h6"] == 0.5 and sft["perplexity/heldout.txt"] == 12.5
    assert sft["pref:preference/pairs.jsonl/accuracy"] == 0.75
    assert sft["pref:preference/pairs.jsonl[operation]/accuracy"] == 0.5
    assert sft["contamination/gsm8k"] == 0.0625
    # standard errors and document counts beside the values; binomial s.e. for preference accuracies
    assert data["details"]["sft"]["gsm8k_local/exact_match,strict-match"] == {"stderr": 0.1, "n": 20}
    assert data["details"]["sft"]["pref:preference/pairs.jsonl[operation]/accuracy"] == {"stderr": 0.25, "n": 4}
    assert data["details"]["sft"]["perplexity/heldout.txt"] == {"stderr": None, "n": 7}
    # full keys stay; short labels beside them
    assert data["labels"]["pref:preference/pairs.jsonl[operation]/accuracy"] == "preference acc., kind operation"
    assert data["labels"]["pref:preference/pairs.jsonl/accuracy"] == "preference acc., all pairs"
    assert data["labels"]["gsm8k_local/exact_match,strict-match"] == "GSM8K exact match (strict)"
    assert data["labels"]["perplexity/heldout.txt"] == "perplexity, heldout.txt"
    assert data["contamination"]["sft"]["gsm8k"] == {
        "result": 0.0625, "method": "neighbours", "examples": 16, "available": 50, "neighbours": 10,
        "verdict": "clean", "threshold": 0.1, "reference": "upscale", "stage": "contamination"}
    assert data["parents"] == {"upscale": [], "sft": ["upscale"]}
    assert data["final_metrics"] == {"sft": {"step": 2, "loss": 1.5, "eval_loss": 1.75}}
    assert data["layer_maps"][0]["stage"] == "upscale" and data["layer_maps"][0]["layer_map"] == [0, 1, 2, 1, 2, 3]


def _recipe(comparisons: list[dict]):
    return types.SimpleNamespace(
        stages={n: None for n in ("upscale", "sft", "clean", "eval_upscale", "eval_sft", "pref_sft", "contamination")},
        path=Path("/r/my.yaml"), raw={"description": "A test run.\n", "report": {"comparisons": comparisons}})


def test_write_report_tables_and_results_json(tmp_path):
    run = make_run(tmp_path / "myrun")
    recipe = _recipe([{"title": "Up vs SFT", "note": "a note", "models": ["upscale", "sft", "missing"]},
                      {"title": "Nothing to show", "models": ["missing"]}])
    out = write_report(run, recipe)
    assert out == run / "report.md"
    md = out.read_text()
    assert md.startswith("# upstack run: myrun\n\nRecipe: `/r/my.yaml`\n\nA test run.\n\n## Reading\n")
    assert "## Scores by stage\n\nEach cell:" in md and "| metric | upscale | sft |\n|---|---:|---:|\n" in md
    # value ± standard error (n=documents), 3 significant digits, short labels
    assert "| GSM8K exact match (strict) | 0.125 ± 0.08 (n=20) | 0.25 ± 0.1 (n=20) |" in md
    assert "| perplexity, heldout.txt | 20 (n=7) | 12.5 (n=7) |" in md
    assert "## Up vs SFT\n\na note\n\n| metric | upscale | sft |" in md and "Nothing to show" not in md
    assert "| clean | train.jsonl | 13 | 10 | 2 | gsm8k: 2 / 5 (1) |" in md
    assert "## Training (last logged values)\n\n| stage | loss | eval_loss | step |" in md
    assert "| sft | 1.5 | 1.75 | 2 |" in md
    assert "![plot_loss.png](plot_loss.png)" in md and "plot_eval_loss.png" not in md
    assert "Stage `upscale` (dus): 4 -> 6 layers." in md and "| 0-2 | 0-2 |" in md and "| 3-5 | 1-3 |" in md
    assert "| sft | sft | 10 | 2024-01-01T00:00:02 |" in md and "| total | | 19.0 | |" in md
    results = json.loads((run / "results.json").read_text())
    assert results == json.loads(json.dumps(collect(run, list(recipe.stages)), default=str))
    assert list(results["stages"])[:2] == ["upscale", "sft"] and results["run_dir"] == str(run)


def test_rows_need_two_models(tmp_path):
    """A row of one value compares nothing: only sft has H6, preference and contamination numbers."""
    md = write_report(make_run(tmp_path), _recipe([{"title": "Up vs SFT", "models": ["upscale", "sft"]},
                                                   {"title": "SFT alone", "models": ["sft"]}])).read_text()
    tables = md.split("## Contamination test")[0]
    assert "| H6" not in tables and "| preference acc." not in tables and "| contamination" not in tables
    assert "GSM8K exact match (strict)" in tables and "SFT alone" not in md
    # ... listed once under the table, not as rows of dashes
    assert "Measured for one model only: H6 (mean of 6): `sft` 0.5; preference acc., all pairs: `sft` 0.75 ± 0.15 (n=8)" in md


def test_one_model_run_shows_its_scores(tmp_path):
    _stage(tmp_path, "sft", "sft", "2024-01-01T00:00:01")
    _stage(tmp_path, "eval_sft", "eval", "2024-01-01T00:00:02", config={"model": str(tmp_path / "sft")},
           files={"results.json": {"results": {"arc_challenge_local": {"acc_norm": 0.3, "acc_norm_stderr": 0.05}},
                                   "n_samples": {"arc_challenge_local": {"original": 100, "effective": 100}}}})
    md = write_report(tmp_path).read_text()
    assert "| ARC-Challenge acc. (length-normalised) | 0.3 ± 0.05 (n=100) |" in md


def test_contamination_explained(tmp_path):
    md = write_report(make_run(tmp_path)).read_text()
    section = md.split("## Contamination test\n\n")[1].split("\n## ")[0]
    assert "> 0.9 likely contaminated, < 0.1 clean" in section
    assert "| sft | gsm8k | 0.0625 | no sign of contamination (< 0.1) | 16 of 50 | 10 | upscale |" in section


def test_reading_compares_each_stage_with_its_start_against_the_noise(tmp_path):
    md = write_report(make_run(tmp_path)).read_text()
    reading = md.split("## Reading\n\n")[1].split("\n## ")[0]
    # +0.125 with 2 combined s.e. = 2 * sqrt(0.1^2 + 0.08^2) = 0.256: within noise; perplexity fell (no s.e.)
    assert "`sft` (from `upscale`)" in reading
    assert "within noise: GSM8K exact match (strict) (+0.12)" in reading
    assert "improved: perplexity, heldout.txt 20 → 12.5 (-38%, no s.e.)" in reading
    # beyond the noise: a bigger rise
    res = tmp_path / "eval_sft" / "results.json"
    data = json.loads(res.read_text())
    data["results"]["gsm8k_local"] = {"exact_match,strict-match": 0.75, "exact_match_stderr,strict-match": 0.1}
    res.write_text(json.dumps(data))
    reading = write_report(tmp_path).read_text().split("## Reading\n\n")[1].split("\n## ")[0]
    assert "improved: GSM8K exact match (strict) 0.125 → 0.75 (+0.62, 2 s.e. 0.26); perplexity" in reading


def test_plots_one_per_kind_of_loss_and_no_tie_point(tmp_path):
    run = make_run(tmp_path)
    dpo = [{"type": "train", "step": 1, "loss": 0.69, "rewards/margin": 0.0, "rewards/accuracy": 0.06},
           {"type": "train", "step": 2, "loss": 0.6, "rewards/margin": 0.3, "rewards/accuracy": 0.7},
           {"type": "eval", "step": 2, "eval_loss": 0.65, "eval_rewards/margin": 0.2, "eval_rewards/accuracy": 0.6}]
    _stage(run, "dpo", "dpo", "2024-01-01T00:00:08", config={"model": str(run / "sft")},
           files={"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in dpo)})
    md = write_report(run).read_text()
    assert set(json.loads((run / PLOT_INDEX).read_text())) == {
        "plot_loss.png", "plot_dpo_loss.png", "plot_rewards_margin.png", "plot_rewards_accuracy.png"}
    assert "every implicit reward is 0" in md
    from upstack.report_plots import _series

    assert _series(dpo, "rewards/accuracy", "training", "dpo") == [(2, 0.7)]
    assert _series(dpo, "eval_rewards/accuracy", "held-out", "dpo") == [(2, 0.6)]
    assert _series(dpo, "loss", "training", "dpo") == [(1, 0.69), (2, 0.6)]


def test_plot_index_keeps_unchanged_plots_and_redraws_missing_ones(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    index = json.loads((run / PLOT_INDEX).read_text())
    assert set(index) == {"plot_loss.png"}
    before = (run / "plot_loss.png").stat().st_mtime_ns
    write_report(run)
    assert (run / "plot_loss.png").stat().st_mtime_ns == before
    (run / "plot_loss.png").unlink()
    write_report(run)
    assert (run / "plot_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run / PLOT_INDEX).read_text()) == index


def test_empty_run_folder(tmp_path):
    md = write_report(tmp_path).read_text()
    assert "## Timings" in md and "| total | | 0.0 | |" in md and "Scores" not in md
    assert json.loads((tmp_path / "results.json").read_text())["models"] == {}


def test_heldout_perplexity_by_tokens_plot_for_pretraining_stages(tmp_path):
    """Continued-pretraining stages whose eval records carry `tokens` get a held-out perplexity curve by tokens
    seen (the point at 0 tokens from `eval_on_start`); stages of other types are not on it."""
    run = make_run(tmp_path)
    for name, losses in (("pretrain", [4.2, 3.5, 3.1]), ("base_more", [3.7, 3.4, 3.3])):
        rows = [{"type": "eval", "step": 5 * i, "tokens": 5120 * i, "eval_loss": x} for i, x in enumerate(losses)]
        _stage(run, name, "pretrain", f"2024-01-01T00:00:1{len(name)}", config={"model": str(run / "upscale")},
               files={"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in rows)})
    md = write_report(run).read_text()
    assert "![plot_heldout_by_tokens.png](plot_heldout_by_tokens.png)" in md
    assert (run / "plot_heldout_by_tokens.png").read_bytes()[:4] == b"\x89PNG"
    from upstack.report_plots import _token_series

    rows = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [(t, round(p, 4)) for t, p in _token_series(rows)] == [(0, 66.6863), (5120, 33.1155), (10240, 22.198)]
    assert _token_series([{"type": "eval", "step": 2, "eval_loss": 1.0}]) == []  # records without tokens


def test_perplexity_standard_error_enters_the_noise_rule(tmp_path):
    """A perplexity with `perplexity_stderr` (over its windows) is compared against 2 combined standard errors,
    and its cell shows the standard error and the number of windows."""
    run = make_run(tmp_path)
    for name, ppl, se in (("eval_sft", 12.5, 3.0), ("eval_upscale", 20.0, 3.0)):
        res = run / name / "results.json"
        data = json.loads(res.read_text())
        data["perplexity"]["/d/heldout.txt"].update({"perplexity": ppl, "perplexity_stderr": se, "windows": 8})
        res.write_text(json.dumps(data))
    md = write_report(run).read_text()
    reading = md.split("## Reading\n\n")[1].split("\n## ")[0]
    assert "perplexity, heldout.txt (-7.5)" in reading  # 7.5 < 2 * sqrt(9 + 9) = 8.5: within noise
    assert "12.5 ± 3 (n=8)" in md
