from __future__ import annotations

import pytest

from elastic_ft.resources.policy import PlanError, memory_pressure, plan_batches, resize_decision


@pytest.mark.parametrize("world", range(1, 17))
@pytest.mark.parametrize("global_batch", [1, 7, 8, 12, 32, 64, 96, 100])
@pytest.mark.parametrize("cap", [1, 2, 3, 4, 8, 64])
def test_plan_invariants(global_batch: int, world: int, cap: int) -> None:
    plan = plan_batches(global_batch, world, cap)
    assert plan.micro_batch * plan.grad_accum * world == plan.global_batch
    assert 1 <= plan.micro_batch <= cap
    if global_batch % world == 0:
        assert plan.global_batch == global_batch and plan.lr_scale == 1.0
        # the largest exact micro-batch under the cap is chosen
        per = global_batch // world
        assert plan.micro_batch == max(m for m in range(1, min(cap, per) + 1) if per % m == 0)
    else:
        # nearest feasible global batch; no feasible one is strictly nearer
        nearest = min(abs(m * a * world - global_batch) for m in range(1, min(cap, global_batch) + 1)
                      for a in range(1, global_batch + 2))
        assert abs(plan.deviation) == nearest
        assert plan.lr_scale == pytest.approx(plan.global_batch / global_batch)


def test_plan_examples() -> None:
    assert plan_batches(8, 2, 2).to_dict()["grad_accum"] == 2
    three = plan_batches(8, 3, 4)
    assert (three.global_batch, three.deviation) == (9, 1) or three.global_batch == 6
    with pytest.raises(PlanError):
        plan_batches(8, 2, 0)


def test_memory_pressure_projects_growth() -> None:
    gib = 1 << 30
    steady = memory_pressure([5 * gib] * 5, 10 * gib, micro_batch=8)
    assert not steady.replan
    growing = memory_pressure([5 * gib, 6 * gib, 7 * gib, 8 * gib, 9 * gib], 10 * gib, 8)
    assert growing.replan and growing.new_max_micro_batch == 4
    assert not memory_pressure([9 * gib] * 3, 10 * gib, micro_batch=1).replan


def test_resize_decisions() -> None:
    # a node joined with room for a worker: Ray is told to look now; the checkpoint is taken
    # when Ray Train's restart asks for it (the restart gate), not yet
    grow = resize_decision(1, 1, 1, 2)
    assert grow.refresh_reservations and not grow.checkpoint_now
    assert grow.target_world_size == 2
    assert resize_decision(1, 5, 1, 4).target_world_size == 4
    steady = resize_decision(2, 3, 1, 2)  # already at max
    assert not steady.checkpoint_now and not steady.refresh_reservations
    drained = resize_decision(2, 0, 1, 2, draining_workers=1)
    assert drained.checkpoint_now and drained.target_world_size == 1
    assert not drained.refresh_reservations
