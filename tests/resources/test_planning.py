"""Per-worker plans and rebalancing over many caps, speeds and world sizes (no Ray)."""

from __future__ import annotations

import itertools
import random

import pytest

from elastic_ft.resources.planning import (
    PlanError,
    RankCost,
    WorkerPlan,
    costs_from_weights,
    fit_cost,
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
    assert split_slots(5, [4, 4], costs_from_weights([1.0, 1.0])) == [3, 2]
    with pytest.raises(PlanError, match="no micro-batch fits"):
        plan_per_worker([4, 0], 8)
    assert WorkerPlan.from_dict(small.to_dict()) == small


def test_lomo_plans_one_micro_step_per_step() -> None:
    """LOMO's update is fused into its one backward: the whole share in one micro-batch, and
    when the caps cannot hold the global batch, the nearest that fits, its rate scaled."""
    rng = random.Random(1)
    for _ in range(500):
        caps = [rng.randint(1, 16) for _ in range(rng.randint(1, 6))]
        global_batch = rng.randint(1, 64)
        plan = plan_per_worker(caps, global_batch, max_grad_accum=1)
        _check(plan, caps, global_batch)
        assert plan.grad_accum == 1
        assert plan.global_batch == max(len(caps), min(global_batch, sum(caps)))
    assert plan_per_worker([4, 4], 8, max_grad_accum=1).micro_batches == (4, 4)
    capped = plan_per_worker([2, 2], 8, max_grad_accum=1)  # without the bound: (2, 2) x 2
    assert (capped.micro_batches, capped.grad_accum, capped.lr_scale) == ((2, 2), 1, 0.5)
    slow = rebalance_decision(plan_per_worker([8, 8], 8, max_grad_accum=1), [1.0, 3.0],
                              costs_from_weights([3.0, 1.0]), 0.1, max_grad_accum=1)
    assert slow.rebalance and slow.new_plan.micro_batches == (6, 2)
    assert slow.new_plan.grad_accum == 1


def _measured(plan: WorkerPlan, costs: list[RankCost]) -> list[float]:
    return [plan.grad_accum * c.micro_step_s(m)
            for m, c in zip(plan.micro_batches, costs, strict=True)]


def test_rebalance_moves_work_off_a_slow_rank_and_then_stays() -> None:
    even = plan_per_worker([8, 8, 8], 12)
    assert even.micro_batches == (4, 4, 4)
    slow = costs_from_weights([1.0, 1.0, 0.5])  # the third rank takes twice as long
    decision = rebalance_decision(even, _measured(even, slow), slow, threshold=0.1)
    assert decision.rebalance and decision.imbalance == pytest.approx(1.0)
    assert decision.new_plan is not None and decision.new_plan.micro_batches == (5, 5, 2)
    assert decision.new_plan.global_batch == 12 and decision.predicted_speedup > 1.5
    # after the re-split, no split is faster: no second restart
    new = decision.new_plan
    assert not rebalance_decision(new, _measured(new, slow), slow, threshold=0.1).rebalance
    # two ranks 1:2: the best integer split leaves 20% imbalance, which must not loop
    half = costs_from_weights([1.0, 0.5])
    two_even = plan_per_worker([8, 8], 8)
    two = rebalance_decision(two_even, _measured(two_even, half), half, 0.1)
    assert two.rebalance and two.new_plan.micro_batches in ((6, 2), (5, 3))  # both take 6
    assert not rebalance_decision(two.new_plan, _measured(two.new_plan, half), half,
                                  0.1).rebalance
    # within the threshold, or not measured: nothing
    near = costs_from_weights([1.0, 0.97, 0.99])
    assert not rebalance_decision(even, _measured(even, near), near, 0.1).rebalance
    assert not rebalance_decision(even, [0.01, None, 0.02], slow, 0.1).rebalance
    # the caps bound the re-split: the fast rank cannot take more than its memory allows
    fast = costs_from_weights([10.0, 1.0])
    capped_plan = plan_per_worker([3, 8], 8)
    capped = rebalance_decision(capped_plan, _measured(capped_plan, fast), fast, 0.1)
    assert capped.new_plan is not None and capped.new_plan.micro_batches[0] <= 3


def test_a_micro_steps_fixed_cost_is_fitted_and_stops_the_chase() -> None:
    """Measured on the benchmark: a slowed rank at micro-batch 2 looked slower per sample
    than at 4 (a micro-step's fixed cost), and a per-sample model pushed it to 1. With both
    sizes measured, the fitted cost predicts no gain from that and the group stays."""
    slow = fit_cost({4: 0.040, 2: 0.024})  # 8 ms fixed + 8 ms per sample
    assert slow.fixed_s == pytest.approx(0.008) and slow.per_sample_s == pytest.approx(0.008)
    fast = fit_cost({4: 0.016, 6: 0.022})  # 4 ms fixed + 3 ms per sample
    assert fast.fixed_s == pytest.approx(0.004) and fast.per_sample_s == pytest.approx(0.003)
    # sizes closer than 1.5x: no line through the noise, the larger size's rate
    assert fit_cost({6: 0.030, 8: 0.032}) == RankCost(0.0, 0.004)
    plan = WorkerPlan((2, 5, 5), 1, 12, 12, 1.0, "exact", (12, 12, 12))
    costs = [slow, fast, fast]
    # per sample alone, the slow rank (24 ms for 2) looks 3x the fast ones (19 ms for 5);
    # the fitted costs see the best split only 1.09x faster: no restart
    decision = rebalance_decision(plan, _measured(plan, costs), costs, 0.1)
    assert decision.imbalance > 0.2 and not decision.rebalance, decision
    assert decision.predicted_speedup == pytest.approx(0.024 / 0.022)
    # one size only: all of it per sample; noise that makes the line fall: the largest size
    assert fit_cost({4: 0.02}) == RankCost(0.0, 0.005)
    assert fit_cost({2: 0.02, 4: 0.019}) == RankCost(0.0, 0.019 / 4)
