from __future__ import annotations

from elastic_ft.resources.policy import memory_pressure, resize_decision


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
