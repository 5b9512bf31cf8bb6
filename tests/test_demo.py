"""The built-in demo end to end (`upstack demo --quick`): every stage's output loads, and the effects that
are robust at this scale show up in the run's own numbers."""

import json

import pytest
import torch

from upstack.cli import main

CHECKPOINT_STAGES = ["base", "upscale", "pretrain", "base_more", "sft_math", "sft_nomath", "dpo", "merge_avg",
                     "merge_slerp"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_demo_quick_outputs_load(demo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_layers = json.loads((demo_run / "base" / "config.json").read_text())["num_hidden_layers"]
    for stage in CHECKPOINT_STAGES:
        folder = demo_run / stage
        assert (folder / "upstack_stage.json").is_file(), stage
        model = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("Question: what is 2 plus 3?", return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all(), stage
        expected = base_layers if stage in ("base", "base_more") else 2 * (base_layers - 2)
        assert model.config.num_hidden_layers == expected, stage
    assert main(["verify", str(demo_run / "merge_slerp")]) == 0
    assert (demo_run / "report.md").is_file()
    for png in ("plot_loss.png", "plot_dpo_loss.png", "plot_rewards_margin.png", "plot_rewards_accuracy.png"):
        assert (demo_run / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_demo_quick_metrics_move(demo_run):
    results = json.loads((demo_run / "results.json").read_text())
    models = results["models"]
    assert set(CHECKPOINT_STAGES) <= set(models)
    for m in CHECKPOINT_STAGES:
        assert 0.0 <= models[m]["arc_challenge_local/acc"] <= 1.0
        assert 0.0 <= models[m]["gsm8k_local/exact_match,strict-match"] <= 1.0
    # SFT on the math set beats the base on its instruction task: it predicts held-out worked answers far better.
    assert models["sft_math"]["perplexity/math_heldout.jsonl"] < 0.8 * models["base"]["perplexity/math_heldout.jsonl"]
    # DPO learns its preferences: reward accuracy and margin on the training pairs rise from step 1 ...
    dpo_rows = [json.loads(line) for line in (demo_run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in dpo_rows if r.get("type") == "train"]
    assert train[0]["rewards/margin"] == pytest.approx(0.0, abs=1e-4)  # the reference is the starting policy
    late = train[len(train) // 2:]
    assert sum(r["rewards/margin"] for r in late) / len(late) > 0.0
    # ... and it raises preference accuracy on held-out pairs (scored in the chat format, as DPO scores them).
    # The robust part is the wrong-operation kind, which a 64-wide model can tell from the words next to the
    # operator; telling a wrong sum from a right one needs arithmetic it does not have (see the README).
    pref = "pref:preference/dpo_heldout.jsonl"
    sft, dpo = models["sft_math"], models["dpo"]
    # Measured over world seeds 0, 1, 2 (README): wrong-operation accuracy +0.29 / +0.17 / +0.12, all pairs
    # +0.11 / +0.10 / +0.07, mean log-prob margin +3.0 / +1.3 / +0.5 nats; the thresholds sit below all three.
    assert dpo[f"{pref}[operation]/accuracy"] >= sft[f"{pref}[operation]/accuracy"] + 0.08
    assert dpo[f"{pref}/accuracy"] >= sft[f"{pref}/accuracy"] + 0.02
    assert dpo[f"{pref}/margin"] > sft[f"{pref}/margin"] + 0.25
    # Training curves went down.
    for stage in ("base", "sft_math"):
        losses = [json.loads(line)["loss"] for line in (demo_run / stage / "metrics.jsonl").read_text().splitlines()
                  if '"loss"' in line and '"type": "train"' in line]
        assert losses[-1] < losses[0], stage
    # The held-out sets share no n-gram with the training files: decontaminate removed nothing, and training
    # read its kept rows.
    for stage in ("decontaminate_math", "decontaminate_facts", "decontaminate_pairs"):
        res = results["stages"][stage]["result"]
        assert res["rows"] > 0 and res["removed"] == 0 and res["kept"] == res["rows"], stage
    sft_cfg = json.loads((demo_run / "sft_math" / "upstack_stage.json").read_text())["config"]
    assert any(d.endswith("decontaminate_math/clean.jsonl") for d in sft_cfg["data"])
    report = (demo_run / "report.md").read_text()
    assert "## Decontamination" in report
    assert "Depth up-scaling at equal extra training tokens" in report and "| 6-11 | 2-7 |" in report


@pytest.mark.slow
def test_demo_quick_report_reads(demo_run):
    """report.md read cold: what each stage did, against the noise; tables compare (two values a row at least)."""
    report = (demo_run / "report.md").read_text()
    reading = report.split("## Reading\n\n")[1].split("\n## ")[0]
    assert "\n" not in reading.strip()  # one paragraph
    for stage, start in (("upscale", "base"), ("pretrain", "upscale"), ("sft_math", "pretrain"),
                         ("sft_lora", "pretrain"), ("dpo", "sft_math")):
        assert f"`{stage}` (from `{start}`" in reading, stage
    assert "within noise" in reading and ("improved" in reading or "worsened" in reading)
    assert "## Full fine-tuning vs LoRA at equal steps" in report
    tables = report.split("## Contamination test")[0]
    rows = [line for line in tables.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    assert rows and all(sum(cell.strip() != "-" for cell in r.strip("|").split("|")[1:]) >= 2 for r in rows)
    assert " ± " in tables and "(n=30)" in tables and "pref:preference" not in tables
    assert "| preference acc., kind operation |" in tables
    section = report.split("## Contamination test\n\n")[1].split("\n## ")[0]
    assert "> 0.9 likely contaminated, < 0.1 clean" in section and "| merge_avg | test |" in section
    assert "| upscale |" in section  # the reference model
    # held-out loss during training: every training stage draws a curve, not a dot
    for stage in ("base", "pretrain", "base_more", "sft_math", "sft_lora", "sft_nomath", "dpo"):
        rows = [json.loads(line) for line in (demo_run / stage / "metrics.jsonl").read_text().splitlines()]
        assert sum(r.get("type") == "eval" for r in rows) >= 3, stage
