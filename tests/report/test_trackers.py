"""The driver's follower feeds the console and the real trackers from the controller's files;
each tracker's output is read back with that library's own reader."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from elastic_ft.config import ConfigError, load_config
from elastic_ft.report.console import Console
from elastic_ft.report.follower import RunFollower, describe
from elastic_ft.report.trackers import check_trackers, open_trackers
from tests.conftest import ROOT
from tests.report.wandb_records import config as wandb_config
from tests.report.wandb_records import history as wandb_history

SECRET = "s3://AKIAEXAMPLE:VerySecretKey@bucket/runs"


def _append(path: Path, *records: dict) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _step(step: int, loss: float, t: float, world: int = 2) -> dict:
    return {"step": step, "loss": loss, "lr": 0.01, "tokens_per_s": 100.0 * step,
            "world_size": world, "peak_mem_bytes": 1000, "train_mem_bytes": 500, "epoch": 0,
            "t": t, "rank_mem_bytes": [500] * world}


def test_follower_feeds_console_and_every_tracker_once_per_step(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "output_dir": str(out), "storage_path": SECRET,
        "logging.trackers": ["tensorboard", "mlflow", "wandb"], "logging.run_name": "t1"})
    _append(out / "metrics.jsonl", _step(99, 9.0, 1.0))  # an earlier run's line: not logged
    stream = io.StringIO()
    trackers = open_trackers(cfg, out)
    follower = RunFollower(out, Console(stream), trackers, total_steps=4, interval_s=0.05)
    follower.start()
    _append(out / "events.jsonl", {"event": "plan", "t": 10.0, "world_size": 2, "grad_accum": 2,
                                   "global_batch": 8, "micro_batches": [2, 2]})
    _append(out / "metrics.jsonl", _step(1, 3.0, 11.0), _step(2, 2.5, 12.0))
    _append(out / "events.jsonl",
            {"event": "eval", "t": 12.5, "step": 2, "eval_loss": 2.75, "perplexity": 15.6,
             "best": True},
            {"event": "resize", "t": 12.6, "from": 2, "to": 1})
    _append(out / "samples.jsonl", {"step": 2, "prompt": "p", "completion": "c",
                                    "reference": "r"})
    with open(out / "metrics.jsonl", "a") as f:  # a line still being written waits
        f.write(json.dumps(_step(3, 2.0, 13.0, world=1))[:20])
    follower.poll()
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(_step(3, 2.0, 13.0, world=1))[20:] + "\n")
    _append(out / "metrics.jsonl", _step(4, 1.5, 14.0, world=1))
    follower.stop()
    for tracker in trackers:
        tracker.close()

    terminal = stream.getvalue().splitlines()
    assert terminal[0].startswith("[elastic_ft] step 1/4 loss 3.0000 tok/s 100 world 2")
    assert "[elastic_ft] eval at step 2: loss 2.7500 perplexity 15.60 (best)" in terminal
    assert "[elastic_ft] resize: 2 -> 1 workers" in terminal
    assert terminal[-1].startswith("[elastic_ft] step 4/4 loss 1.5000 eval 2.7500")
    assert len(terminal) == len(set(terminal))

    # TensorBoard's own event reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    assert [(s.step, s.value) for s in board.Scalars("train/loss")] == [
        (1, 3.0), (2, 2.5), (3, 2.0), (4, 1.5)]
    assert [s.step for s in board.Scalars("eval/loss")] == [2]
    assert {"events/resize/text_summary", "events/eval/text_summary", "samples/text_summary",
            "config/text_summary"} <= set(board.Tags()["tensors"])

    # MLflow's client on the store it wrote (SQLite in the output dir by default)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("elastic_ft").experiment_id])
    assert run.info.run_name == "t1" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(
        run.info.run_id, "train_loss")] == [(1, 3.0), (2, 2.5), (3, 2.0), (4, 1.5)]
    assert client.get_metric_history(run.info.run_id, "eval_perplexity")[0].value == 15.6
    assert run.data.params["optim.lr"] == "0.01"
    assert "VerySecretKey" not in json.dumps(run.data.params)
    assert "<redacted>" in run.data.params["storage_path"]
    tags = client.get_run(run.info.run_id).data.tags
    assert any(k.endswith(".resize") for k in tags), tags
    assert list((out / "mlartifacts").rglob("samples.json"))  # beside the store, not in cwd

    # W&B's offline transaction log, parsed with W&B's record schema
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(log)
    losses = [(r["train/step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert losses == [(1, 3.0), (2, 2.5), (3, 2.0), (4, 1.5)]
    assert [r["eval/loss"] for r in rows if "eval/loss" in r] == [2.75]
    assert [r["samples/_type"] for r in rows if "samples/_type" in r] == ["table-file"]
    assert [r["events/_type"] for r in rows if "events/_type" in r] == ["html-file"] * 2
    settings = wandb_config(log)
    assert settings["optim.lr"] == 0.01 and "VerySecretKey" not in json.dumps(settings)


def test_a_missing_tracker_package_fails_before_training(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: import fails
    with pytest.raises(ConfigError, match=r"pip install 'elastic_ft\[wandb\]'"):
        check_trackers(["tensorboard", "wandb"])
    from elastic_ft.core.trainer import run_training

    cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "output_dir": str(tmp_path / "o"), "logging.trackers": ["wandb"]})
    with pytest.raises(ConfigError, match="logging.trackers has wandb"):
        run_training(cfg)
    assert not (tmp_path / "o").exists()  # nothing was started or written


def test_every_decision_has_one_terminal_line_and_bookkeeping_none() -> None:
    assert describe({"event": "rebalance", "step": 12, "reason": "rank 1 is 1.4x slower"}) == (
        "rebalance at step 12: rank 1 is 1.4x slower")
    assert describe({"event": "jit_checkpoint", "step": 7, "reason": "drain",
                     "seconds": 1.234}) == "just-in-time checkpoint at step 7 (drain, 1.23 s)"
    assert describe({"event": "plan", "world_size": 2}) is None
    assert describe({"event": "reservations_refreshed"}) is None


def test_mlflow_honours_mlflow_tracking_uri(tmp_path, monkeypatch) -> None:
    from mlflow import MlflowClient

    server = f"sqlite:///{tmp_path}/team.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    out = tmp_path / "run"
    out.mkdir()
    cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "output_dir": str(out), "logging.trackers": ["mlflow"], "logging.project": "team"})
    (tracker,) = open_trackers(cfg, out)
    tracker.log_metrics(1, {"train/loss": 2.0})
    tracker.close()
    client = MlflowClient(tracking_uri=server)
    (run,) = client.search_runs([client.get_experiment_by_name("team").experiment_id])
    assert client.get_metric_history(run.info.run_id, "train_loss")[0].value == 2.0
    assert not (out / "mlflow.db").exists()  # not the local default
