"""LOMO under Ray Train (issue 22): `optim.name: lomo` trains at 2 workers (each gradient
all-reduced inside its backward hook, then applied and freed), checkpoints, and resumes at 1.
LOMO is SGD fused into the backward, so every step's loss must equal plain SGD with
gradient-norm clipping on the same global batches (computed here, in this process, with
torch's own SGD, `clip_grad_norm_` and LambdaLR) within 1e-5, at both world sizes and across
the resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elastic_ft.config import load_config
from elastic_ft.events import read_events
from tests.conftest import ROOT

pytestmark = pytest.mark.ray

STEPS = 6
SETTINGS = {"method.kind": "full", "optim.name": "lomo", "optim.lr": 0.01,
            "optim.grad_clip": 1.0, "optim.schedule": "constant", "optim.warmup_steps": 2,
            "deepspeed.zero_stage": 0, "train.global_batch": 4, "train.micro_batch": 4,
            "checkpoint.every_steps": 4}


def _cfg(tiny_assets: Path, out: Path, **overrides):
    return load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": str(tiny_assets), "output_dir": str(out), **SETTINGS,
        **overrides})


def _sgd_reference(cfg, prepared_dir: Path) -> list[dict[str, float]]:
    """Plain torch SGD + clip_grad_norm_ + LambdaLR over the run's global batches, with the
    run's loss: the token mean over the whole global batch."""
    import torch

    from elastic_ft.core.engine import lr_lambda
    from elastic_ft.core.model import load_model
    from elastic_ft.data.prepared import DataPosition, PreparedData

    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, STEPS))
    data, position, steps = PreparedData.open(prepared_dir), DataPosition(), []
    for _ in range(STEPS):
        indices, position = data.global_batch(position, cfg.train.global_batch,
                                              cfg.train.seed, cfg.data.shuffle)
        batch = data.batch(indices)
        loss = model(**batch, use_cache=False,
                     num_items_in_batch=torch.tensor(data.trainable_tokens(indices))).loss
        loss.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # metrics.jsonl's lr, as DeepSpeed's: the rate after the step's scheduler step
        steps.append({"loss": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": norm})
    return steps


def test_lomo_trains_at_two_workers_and_resumes_at_one_as_sgd_with_clipping(
        tiny_assets, ray_local, tmp_path) -> None:
    from elastic_ft.core.trainer import run_training

    out = tmp_path / "run"
    run_training(_cfg(tiny_assets, out, **{"train.max_steps": 4}), export=False)
    run_training(_cfg(tiny_assets, out, **{"train.max_steps": STEPS, "workers.min": 1,
                                           "workers.max": 1}), export=False)
    events = read_events(out / "events.jsonl")
    resume = [e for e in events if e["event"] == "resume"][-1]
    assert (resume["step"], resume["from_world_size"], resume["world_size"]) == (4, 2, 1)
    assert resume["universal"] is False  # nothing is sharded: any world size loads it as is
    plans = [(e["world_size"], e["plan"]["micro_batches"], e["plan"]["grad_accum"])
             for e in events if e["event"] == "start"]
    assert plans == [(2, [2, 2], 1), (1, [4], 1)]  # one micro-step per step, whole batch
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    trained = {r["step"]: r for r in rows if "loss" in r}
    assert sorted(trained) == list(range(1, STEPS + 1))

    reference = _sgd_reference(_cfg(tiny_assets, out), out / "prepared")
    assert any(s["grad_norm"] > SETTINGS["optim.grad_clip"] for s in reference)  # clipping on
    for step, ref in enumerate(reference, start=1):
        assert trained[step]["lr"] == pytest.approx(ref["lr"], rel=1e-9), step
        assert trained[step]["loss"] == pytest.approx(ref["loss"], abs=1e-5), (step, trained,
                                                                               reference)
    # the final weights are a plain Hugging Face model
    assert (out / "final" / "model.safetensors").exists()
