"""--report-to: wandb (offline), MLflow (a file store) and trackio (local) get the metrics of metrics.jsonl and
the run config; an unknown or missing tracker fails before work."""

import json
import os
import subprocess
import sys

import pytest
from tiny import build_tiny_model

RUN = r"""
import sys
from upstack.cli import main
sys.exit(main(sys.argv[1:]))
"""

READ = r"""
import json, sys
from pathlib import Path
out = {}
import mlflow
client = mlflow.MlflowClient()
exp = client.get_experiment_by_name("upstack")
run = client.search_runs([exp.experiment_id])[0]
out["mlflow_loss"] = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
out["mlflow_params"] = run.data.params
from trackio.sqlite_storage import SQLiteStorage
runs = SQLiteStorage.get_runs("upstack")
logs = SQLiteStorage.get_logs("upstack", runs[0])
out["trackio_loss"] = [r["train/loss"] for r in logs if "train/loss" in r]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_metrics_reach_wandb_mlflow_and_trackio_offline(tmp_path):
    for package in ("wandb", "mlflow", "trackio"):
        pytest.importorskip(package)
    model = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2)
    rows = [{"instruction": f"Say {w} ({i})", "input": "", "output": f"{w} {w}."}
            for i, w in enumerate(["red", "blue", "green", "gold"] * 4)]
    data = tmp_path / "a.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}",
           "MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": str(tmp_path / "trackio")}
    (tmp_path / "wandb").mkdir()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", RUN, "sft", str(model), "--data", str(data), "--out", str(out),
                           "--max-steps", "3", "--batch-size", "4", "--logging-steps", "1", "-q",
                           "--report-to", "tensorboard,wandb,mlflow,trackio"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert len(ours) == 3
    assert list((tmp_path / "wandb").rglob("*.wandb")), "no offline wandb run file"
    read = subprocess.run([sys.executable, "-c", READ], env=env, capture_output=True, text=True, timeout=300)
    assert read.returncode == 0, read.stderr[-3000:]
    got = json.loads(read.stdout.strip().splitlines()[-1])
    assert got["mlflow_loss"] == pytest.approx(ours)
    assert got["trackio_loss"] == pytest.approx(ours)
    assert got["mlflow_params"]["stage"] == "sft" and got["mlflow_params"]["max_steps"] == "3"
    assert any((out / "tensorboard").iterdir())


def test_unknown_or_missing_trackers_fail_before_work(tmp_path, capsys, monkeypatch):
    from upstack.cli import main

    model = build_tiny_model(tmp_path / "m", "llama", num_hidden_layers=2)
    args = ["sft", str(model), "--data", "x.jsonl", "--out", str(tmp_path / "o")]
    assert main([*args, "--report-to", "wandbb"]) == 2
    assert "report_to: 'wandbb' is not one of tensorboard, wandb, mlflow, trackio, none" in capsys.readouterr().err
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "mlflow" else find(n, *a))
    assert main([*args, "--report-to", "mlflow"]) == 2
    assert "mlflow is not installed (pip install mlflow)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
