"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, written from the driver.

One place logs (the driver's `RunFollower`, from the controller's metrics and events), once
per step, whatever the world size. Each tracker takes the same four calls: the config as
parameters (secrets redacted), a step's scalars, an event as a text annotation, and the
generated samples. Steps are the run's own: a step redone after a restart is logged again
(MLflow and TensorBoard keep both points; W&B plots against the `train/step` metric, since
its own step counter only moves forward).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from elastic_ft.config import ConfigError, RunConfig
from elastic_ft.events import redact

# tracker -> (module to import, extra to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}


def check_trackers(names: list[str]) -> None:
    """Before any compute: every tracker asked for can be imported."""
    missing = []
    for name in names:
        module, extra = PACKAGES[name]
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"logging.trackers has {name} but its package is not installed: "
                           f"pip install 'elastic_ft[{extra}]'")
    if missing:
        raise ConfigError("\n".join(missing))


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 1e-4}}` -> `{"optim.lr": 1e-4}`, secrets redacted."""
    out: dict[str, Any] = {}
    for key, value in redact(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        else:
            out[name] = value
    return out


class TensorBoardTracker:
    def __init__(self, cfg: RunConfig, out: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        params = flat_params(cfg.to_dict())
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_event(self, step: int, name: str, text: str) -> None:
        self.writer.add_text(f"events/{name}", text, step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        rows = [f"**prompt:** {s['prompt']}\n\n**completion:** {s['completion']}"
                for s in samples]
        self.writer.add_text("samples", "\n\n---\n\n".join(rows), step)

    def close(self) -> None:
        self.writer.close()


class MlflowTracker:
    """`MLFLOW_TRACKING_URI` when set, else a SQLite store in the run's output dir."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        from mlflow import MlflowClient

        server = os.environ.get("MLFLOW_TRACKING_URI")
        self.client = MlflowClient(tracking_uri=server or f"sqlite:///{out.resolve()}/mlflow.db")
        experiment = self.client.get_experiment_by_name(cfg.logging.project)
        # the local store keeps its artifacts beside it, not in ./mlruns of the working dir
        artifacts = None if server else (out.resolve() / "mlartifacts").as_uri()
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(cfg.logging.project, artifacts))
        self.run_id = self.client.create_run(
            experiment_id, run_name=cfg.logging.run_name or out.name,
            tags={"elastic_ft.output_dir": str(out)}).info.run_id
        for key, value in flat_params(cfg.to_dict()).items():
            self.client.log_param(self.run_id, key, str(value)[:6000])
        self.events = 0

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key.replace("/", "_"), float(value), now, step)
            for key, value in values.items()])

    def log_event(self, step: int, name: str, text: str) -> None:
        self.events += 1  # tags are the run's annotations; one per event, in order
        self.client.set_tag(self.run_id, f"event.{self.events:04d}.{name}",
                            f"step {step}: {text}")

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.client.log_table(self.run_id, data={
            "step": [step] * len(samples), "prompt": [s["prompt"] for s in samples],
            "completion": [s["completion"] for s in samples]},
            artifact_file="samples.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """Offline (files under OUTPUT/wandb/) unless W&B credentials are present."""

    def __init__(self, cfg: RunConfig, out: Path) -> None:
        import wandb

        online = bool(os.environ.get("WANDB_API_KEY")) and os.environ.get("WANDB_MODE") != (
            "offline")
        self.wandb = wandb
        self.run = wandb.init(project=cfg.logging.project, name=cfg.logging.run_name or out.name,
                              dir=str(out), mode="online" if online else "offline",
                              config=flat_params(cfg.to_dict()), reinit="create_new")
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log({"train/step": step, **values})

    def log_event(self, step: int, name: str, text: str) -> None:
        self.run.log({"train/step": step, "events": self.wandb.Html(
            f"<b>{name}</b> step {step}: {text}")})

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        table = self.wandb.Table(columns=["step", "prompt", "completion"],
                                 data=[[step, s["prompt"], s["completion"]] for s in samples])
        self.run.log({"train/step": step, "samples": table})

    def close(self) -> None:
        self.run.finish()


TRACKERS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


def open_trackers(cfg: RunConfig, out: Path) -> list[Any]:
    check_trackers(cfg.logging.trackers)
    return [TRACKERS[name](cfg, out) for name in cfg.logging.trackers]
