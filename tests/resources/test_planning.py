"""Per-worker plans and rebalancing over many caps, speeds and world sizes (no Ray)."""

from __future__ import annotations

import itertools
import random

import pytest

from elastic_ft.resources.planning import (
    PlanError,
    WorkerPlan,
    plan_batches,
    plan_per_worker,
    rebalance_decision,
    split_slots,
)


def _check(plan: WorkerPlan, caps: list[int], global_batch: int) -> None:
    assert plan.world_size == len(caps)
    assert sum(plan.micro_batches) * plan.grad_accum == plan.global_batch
    assert all(1 <= m <= c for m, c in zip(plan.micro_batches, caps, strict=True))
    assert plan.lr_scale == pytest.approx(plan.global_batch / global_batch)


@pytest.mark.parametrize("global_batch", [1, 7, 8, 12, 32, 64, 96, 100])
def test_even_caps_invariants(global_batch: int) -> None:
    for world, cap in itertools.product(range(1, 17), [1, 2, 3, 4, 8, 64]):
        plan = plan_batches(global_batch, world, cap)
        _check(plan, [cap] * world, global_batch)
        # ranks differ by at most one micro-batch slot when they are alike
        assert max(plan.micro_batches) - min(plan.micro_batches) <= 1
        exact = [a for a in range(1, global_batch + 1)
                 if global_batch % a == 0 and world <= global_batch // a <= world * cap]
        if exact:  # exact, with the fewest micro-steps that fit
            assert plan.global_batch == global_batch and plan.grad_accum == exact[0]
        else:  # nearest feasible global batch; nothing feasible is strictly nearer
            nearest = min(abs(s * a - global_batch) for a in range(1, global_batch + 2)
                          for s in range(world, world * min(cap, global_batch) + 1))
            assert abs(plan.deviation) == nearest


def test_unequal_caps_and_speeds_random() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        world = rng.randint(1, 9)
        caps = [rng.randint(1, 16) for _ in range(world)]
        weights = [rng.uniform(0.2, 5.0) for _ in range(world)]
        global_batch = rng.randint(1, 128)
        plan = plan_per_worker(caps, global_batch, weights)
        _check(plan, caps, global_batch)
        # water-filling is optimal: no single slot moved from the slowest-finishing rank to
        # another rank with room would finish the step sooner
        times = [m / w for m, w in zip(plan.micro_batches, weights, strict=True)]
        slow = max(range(world), key=lambda r: times[r])
        if plan.micro_batches[slow] > 1:
            for r in range(world):
                if r != slow and plan.micro_batches[r] < min(caps[r], global_batch):
                    assert (plan.micro_batches[r] + 1) / weights[r] >= times[slow] - 1e-9


def test_examples() -> None:
    # 12 over 5 alike ranks: an uneven split is exact where an even one could not be
    assert plan_batches(12, 5, 8).micro_batches == (3, 3, 2, 2, 2)
    # a small device gets a small micro-batch; the accumulation is shared
    small = plan_per_worker([4, 1], 8)
    assert (small.micro_batches, small.grad_accum, small.global_batch) == ((3, 1), 2, 8)
    # twice as fast gets about twice the share
    assert plan_per_worker([8, 8, 8], 10, [1.0, 1.0, 0.5]).micro_batches == (4, 4, 2)
    # 7 over 2 ranks of cap 1: the nearest feasible global batch, the smaller on a tie
    odd = plan_per_worker([1, 1], 7)
    assert (odd.global_batch, odd.lr_scale) == (6, pytest.approx(6 / 7))
    assert split_slots(5, [4, 4], [1.0, 1.0]) == [3, 2]
    with pytest.raises(PlanError, match="no micro-batch fits"):
        plan_per_worker([4, 0], 8)
    assert WorkerPlan.from_dict(small.to_dict()) == small


def test_rebalance_moves_work_off_a_slow_rank_and_then_stays() -> None:
    even = plan_per_worker([8, 8, 8], 12)
    assert even.micro_batches == (4, 4, 4)
    slow = [0.01, 0.01, 0.02]  # the third rank takes twice as long per sample
    decision = rebalance_decision(even, slow, threshold=0.1)
    assert decision.rebalance and decision.imbalance == pytest.approx(1.0)
    assert decision.new_plan is not None and decision.new_plan.micro_batches == (5, 5, 2)
    assert decision.new_plan.global_batch == 12 and decision.predicted_speedup > 1.5
    # after the re-split, no split is faster: no second restart
    again = rebalance_decision(decision.new_plan, slow, threshold=0.1)
    assert not again.rebalance
    # two ranks 1:2: the best integer split leaves 20% imbalance, which must not loop
    two = rebalance_decision(plan_per_worker([8, 8], 8), [0.01, 0.02], 0.1)
    assert two.rebalance and two.new_plan.micro_batches in ((6, 2), (5, 3))  # both take 6
    assert not rebalance_decision(two.new_plan, [0.01, 0.02], 0.1).rebalance
    # measured on the benchmark: swapping the two fast ranks' shares would gain 5%, which
    # a restart does not pay back
    settled = WorkerPlan((1, 6, 5), 1, 12, 12, 1.0, "exact", (11, 11, 11))
    assert not rebalance_decision(settled, [0.015164, 0.002757, 0.002621], 0.1).rebalance
    # within the threshold, or not measured: nothing
    assert not rebalance_decision(even, [0.01, 0.0105, 0.0102], 0.1).rebalance
    assert not rebalance_decision(even, [0.01, None, 0.02], 0.1).rebalance
    # the caps bound the re-split: the fast rank cannot take more than its memory allows
    capped = rebalance_decision(plan_per_worker([3, 8], 8), [0.001, 0.01], 0.1)
    assert capped.new_plan is not None and capped.new_plan.micro_batches[0] <= 3
