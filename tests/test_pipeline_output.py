"""What `upstack run` says while it works: a start and a "done in N s" line per stage, and a heartbeat for
a long stage."""

import time

from tiny import build_tiny_model


def test_each_stage_says_when_it_starts_and_ends(tmp_path):
    from upstack.pipeline import load_recipe, run_recipe

    model = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2)
    p = tmp_path / "r.yaml"
    p.write_text(f"name: chain\nstages:\n  upscale:\n    source: {model}\n    m: 0\n")
    lines = []
    run_recipe(load_recipe(p, tmp_path / "run"), log=lines.append, quiet=True, report=False)
    assert lines[0].startswith("[upscale] running upscale -> ")
    assert lines[-1].startswith("[upscale] done in ") and lines[-1].endswith(" s")
    lines.clear()
    run_recipe(load_recipe(p, tmp_path / "run"), log=lines.append, quiet=True, report=False)
    assert lines == ["[upscale] up to date, skipped"]


def test_a_long_stage_gets_a_heartbeat(monkeypatch):
    from upstack.pipeline import run as run_mod

    monkeypatch.setattr(run_mod, "HEARTBEAT_SECONDS", 0.05)
    lines = []
    with run_mod._heartbeat("sft", lines.append):
        time.sleep(0.3)
    assert len(lines) >= 2 and all(x.startswith("[sft] still running (") for x in lines)
    lines.clear()
    with run_mod._heartbeat("sft", None):  # other processes of a launch stay silent
        time.sleep(0.1)
    assert lines == []
