"""An uneven split trains the same step as an even one, at every ZeRO stage.

Two real gloo ranks, real DeepSpeed engines built by `build_engine` with each rank's own config,
stepped by the workers' own `train_step`. Rank 0 takes 3 blocks per micro-step and rank 1 one
(2 micro-steps, global batch 8) against 2 + 2: the per-step losses must agree within 1e-4, and
so must the weights after the steps. A skipped or doubled block, or a loss normalised per rank
instead of per global batch, moves them by > 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elastic_ft.config import load_config
from tests.conftest import ROOT, random_blocks, spawn_ranks

SPLITS = {"even": (2, 2), "uneven": (3, 1)}
STEPS = 3


def _prepared(tmp_path: Path):
    from elastic_ft.data.prepared import PreparedData

    return PreparedData.open(tmp_path / "data")


def _rank(rank: int, port: int, tiny_assets: str, tmp: str) -> None:
    import torch
    import torch.distributed as dist

    from elastic_ft.core.engine import build_engine
    from elastic_ft.core.model import load_model
    from elastic_ft.core.probe import local_process_group
    from elastic_ft.core.step import Faults, train_step
    from elastic_ft.data.prepared import DataPosition, rank_slots, take_blocks
    from elastic_ft.resources.planning import WorkerPlan

    local_process_group(rank, 2, port)
    data = _prepared(Path(tmp))
    results: dict[str, list[float]] = {}
    for stage in (0, 1, 2, 3):
        cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
            "model.name_or_path": tiny_assets, "output_dir": tmp, "method.kind": "full",
            "deepspeed.zero_stage": stage, "optim.lr": 0.003, "optim.warmup_steps": 0})
        for name, micro in SPLITS.items():
            plan = WorkerPlan(micro, 2, 8, 8, 1.0, "test")
            torch.manual_seed(0)
            engine, _ = build_engine(cfg, load_model(cfg), plan, STEPS, False, rank)
            losses, position = [], DataPosition()
            for _ in range(STEPS):
                indices, position = data.global_batch(position, 8, 0, True)
                n = data.trainable_tokens(indices)
                step = train_step(engine, rank_slots(indices, micro, rank, 2),
                                  lambda slot: take_blocks(data.table, __import__(
                                      "numpy").asarray(slot)), n, 2, 2, Faults())
                total = step.loss_sum.detach().clone()
                dist.all_reduce(total)
                losses.append(total.item() / 4)
            if stage == 3:
                weights = engine._zero3_consolidated_16bit_state_dict()
            else:
                weights = engine.module.state_dict()
            norm = sum(float(v.float().norm()) for v in weights.values()) if rank == 0 else 0
            results[f"{stage}/{name}"] = losses + [norm]
            del engine
    if rank == 0:
        Path(tmp, "losses.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_uneven_split_matches_even_split_at_every_zero_stage(tmp_path, tiny_assets) -> None:
    from elastic_ft.core.ports import free_port

    random_blocks(tmp_path / "data", 40, seed=3)  # once: two ranks writing it would race
    spawn_ranks(_rank, 2, free_port(), str(tiny_assets), str(tmp_path))
    results = json.loads((tmp_path / "losses.json").read_text())
    for stage in (0, 1, 2, 3):
        even, uneven = results[f"{stage}/even"], results[f"{stage}/uneven"]
        assert len(even) == STEPS + 1
        for a, b in zip(even, uneven, strict=True):
            assert b == pytest.approx(a, abs=1e-4, rel=1e-5), (stage, even, uneven)
    # the test can tell: the weights moved, and the steps' losses differ from each other
    assert len({round(x, 4) for x in results["0/even"][:STEPS]}) == STEPS
