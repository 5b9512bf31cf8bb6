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


def _wandb_records(path):
    """The records of an offline wandb run file (`run-*.wandb`): LevelDB's log format (32 KiB blocks of
    checksummed, possibly fragmented records) after a 7-byte `:W&B` header, each record one protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, part = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:                           # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):                     # FULL, or LAST of a fragmented record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part + payload)
            part = b""
            yield record
        elif kind in (2, 3):                   # FIRST, MIDDLE
            part += payload
        else:                                  # zero padding at a block's end
            pos += block - pos % block if pos % block else 0


def wandb_logged(path) -> tuple[list, dict]:
    """(train/loss at each logged step, in step order; the run's config) from an offline wandb run file."""
    losses, config = {}, {}
    for record in _wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            # "train/loss" is stored as the nested key ["train", "loss"]
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if "train/loss" in items:
                losses[items["_step"]] = items["train/loss"]
        elif kind in ("run", "config"):
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in update})
    return [losses[k] for k in sorted(losses)], config


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
    files = list((tmp_path / "wandb").rglob("*.wandb"))
    assert len(files) == 1, files
    wandb_loss, wandb_config = wandb_logged(files[0])
    assert wandb_loss == pytest.approx(ours)
    assert wandb_config["stage"] == "sft" and wandb_config["max_steps"] == 3
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
