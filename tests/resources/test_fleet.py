"""The controller's per-device bookkeeping, without Ray: budgets from each rank's own node,
caps per device, memory re-plans per rank, rebalancing on measured speed."""

from __future__ import annotations

import pytest

from elastic_ft.core.memory import ModelShape
from elastic_ft.core.optimizer import MicroBatchCaps
from elastic_ft.resources.fleet import WARMUP_STEPS, Fleet
from elastic_ft.resources.inventory import (
    RankPlace,
    inventory_row,
    rank_budget_bytes,
    render_inventory,
)

GIB = 1024**3


def _gpu_node(node_id: str, name: str, gib: int, count: int = 1, market: str = "") -> dict:
    return {"node_id": node_id, "cpu_count": 8, "mem_total_bytes": 64 * GIB,
            "mem_used_bytes": GIB, "labels": {"ray.io/market-type": market} if market else {},
            "gpus": [{"index": i, "name": name, "mem_total_bytes": gib * GIB,
                      "mem_used_bytes": GIB // 2} for i in range(count)]}


class FixedCaps(MicroBatchCaps):
    """Caps straight from the budget: one micro-batch per GiB (the memory model's shape is
    tested elsewhere; here the bookkeeping is)."""

    def modelled(self, budget_bytes: int) -> int:
        return budget_bytes // GIB


def _fleet(threshold: float | None = 0.1, use_gpu: bool = True, **kw) -> Fleet:
    caps = FixedCaps(ModelShape.__new__(ModelShape), {}, limit=64, requested=kw.pop("req", None))
    return Fleet(caps, 16, use_gpu, 1.0, kw.pop("cap", None), threshold, rebalance_window=3)


def test_budgets_come_from_each_ranks_own_device_never_the_driver() -> None:
    a100 = _gpu_node("a", "NVIDIA A100-SXM4-80GB", 80, 2)
    l4 = _gpu_node("b", "NVIDIA L4", 24)
    # a GPU rank: its own GPU's total, by the id Ray gave it
    assert rank_budget_bytes(RankPlace("a", ("1",)), a100, 2, True, 0.9, None) == int(
        80 * GIB * 0.9)
    assert rank_budget_bytes(RankPlace("b", ("0",)), l4, 1, True, 0.9, None) == int(
        24 * GIB * 0.9)
    # no NVML on the node: the rank's own CUDA figure, never a guess
    bare = {"node_id": "c", "mem_total_bytes": 32 * GIB, "gpus": []}
    assert rank_budget_bytes(RankPlace("c", ("0",), 40 * GIB), bare, 1, True, 1.0, None) == (
        40 * GIB)
    with pytest.raises(ValueError, match="no GPU memory"):
        rank_budget_bytes(RankPlace("c", ("0",)), bare, 1, True, 1.0, None)
    # CPU ranks share their node's RAM; the config's cap and the node's override come first
    assert rank_budget_bytes(RankPlace("c"), bare, 4, False, 1.0, None) == 8 * GIB
    assert rank_budget_bytes(RankPlace("c"), dict(bare, mem_budget_override_bytes=5), 4,
                             False, 1.0, None) == 5
    assert rank_budget_bytes(RankPlace("a", ("0",)), a100, 1, True, 0.9, 7) == 7


def test_mixed_fleet_plans_each_worker_from_its_device() -> None:
    fleet = _fleet(req=None)
    fleet.samples = {"a": _gpu_node("a", "A100", 80, market="spot"),
                     "b": _gpu_node("b", "L4", 24)}
    plan, events = fleet.new_group([RankPlace("a", ("0",)), RankPlace("b", ("0",))])
    assert [d.cap for d in fleet.ranks] == [64, 24]  # 80 GiB caps at the limit, 24 at 24
    assert [d.device_type for d in fleet.ranks] == ["A100", "L4"]
    assert sum(plan.micro_batches) * plan.grad_accum == 16 and events == []
    rows = [inventory_row(s) for s in fleet.samples.values()]
    assert rows[0]["market"] == "spot" and rows[1]["gpu_mem_bytes"] == [24 * GIB]
    assert "A100" in render_inventory(rows)
    # a requested micro-batch above a small device's cap is lowered for that rank alone
    fleet = _fleet(req=32)
    fleet.samples = {"a": _gpu_node("a", "A100", 80), "b": _gpu_node("b", "L4", 4)}
    plan, events = fleet.new_group([RankPlace("a", ("0",)), RankPlace("b", ("0",))])
    assert [d.cap for d in fleet.ranks] == [32, 4]
    assert [(e["rank"], e["requested"], e["chosen"]) for e in events] == [(1, 32, 4)]
    assert plan.micro_batches[1] <= 4


def test_memory_pressure_and_oom_lower_that_ranks_cap_only() -> None:
    fleet = _fleet(threshold=None, cap=10 * GIB)
    fleet.samples = {"a": _gpu_node("a", "A100", 80), "b": _gpu_node("b", "A100", 80)}
    places = [RankPlace("a", ("0",)), RankPlace("b", ("0",))]
    plan, _ = fleet.new_group(places)
    assert plan.micro_batches == (8, 8)
    quiet = fleet.observe([5 * GIB, 5 * GIB], None)
    assert quiet is None
    # rank 1's peaks climb toward its budget: only rank 1's device gets a lower cap
    for peak in (6, 7, 8, 9):
        replan = fleet.observe([5 * GIB, peak * GIB], None)
    assert replan is not None and replan.kind == "memory" and replan.event["rank"] == 1
    plan, _ = fleet.new_group(places)
    assert plan.micro_batches == (10, 4) or plan.micro_batches[1] <= 5
    assert fleet.ranks[1].cap <= 5 and fleet.ranks[0].cap == 10
    # an OOM halves again, and the lowered cap sticks to that device in later groups
    fleet.lower_cap(1, fleet.ranks[1].cap // 2)
    plan, _ = fleet.new_group(places)
    assert fleet.ranks[1].cap <= 2 and fleet.ranks[1].cap_source.startswith("lowered")


def test_rebalance_after_warmup_and_window_then_new_groups_start_balanced() -> None:
    fleet = _fleet(threshold=0.1)
    fleet.samples = {n: _gpu_node(n, "A100", 80) for n in "abc"}
    places = [RankPlace(n, ("0",)) for n in "abc"]
    plan, _ = fleet.new_group(places)
    assert plan.micro_batches in ((6, 5, 5), (5, 6, 5), (5, 5, 6), (8, 4, 4)) or sum(
        plan.micro_batches) * plan.grad_accum == 16
    per_sample = [0.01, 0.01, 0.03]  # node c is 3x slower
    decisions = []
    for _ in range(WARMUP_STEPS + 1 + 3):
        decisions.append(fleet.observe(None, [s * m * plan.grad_accum for s, m in
                                              zip(per_sample, plan.micro_batches, strict=True)]))
    assert decisions[:-1] == [None] * (WARMUP_STEPS + 3)
    replan = decisions[-1]
    assert replan is not None and replan.kind == "rebalance"
    assert replan.event["nodes"] == ["a", "b", "c"] and replan.event["to"][2] < 4
    assert replan.event["costs"][2][1] == pytest.approx(0.03)
    # near the end of the run a restart would not pay back: no rebalance
    late = _fleet(threshold=0.1)
    late.samples, late.total_steps = fleet.samples, 100
    late_plan, _ = late.new_group(places)
    late_decisions = [late.observe(None, [s * m * late_plan.grad_accum for s, m in zip(
        per_sample, late_plan.micro_batches, strict=True)], step=95 + i, step_s=0.1)
        for i in range(WARMUP_STEPS + 4)]
    assert late_decisions == [None] * len(late_decisions)  # 0.1 s/step x 5 steps < 30 s
    # the next group (ranks renumbered) is planned with the measured speeds
    plan, _ = fleet.new_group([RankPlace(n, ("0",)) for n in "cab"])
    assert plan.micro_batches[0] < min(plan.micro_batches[1:])
    # a node that joins gets its type's measured speed, not a guess
    fleet.samples["d"] = _gpu_node("d", "A100", 80)
    plan, _ = fleet.new_group([RankPlace(n, ("0",)) for n in "abcd"])
    assert sum(plan.micro_batches) * plan.grad_accum == 16
