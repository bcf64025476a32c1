"""Pure decisions of the elastic controller: batch plans, resize and memory-pressure reactions.

Shaped like Ray Train V2's scaling/failure policies: plain inputs in, a frozen decision
dataclass out, no Ray, so every rule is unit-tested over many world sizes and caps.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


class PlanError(ValueError):
    """No micro-batch of at least 1 fits."""


@dataclass(frozen=True)
class BatchPlan:
    world_size: int
    micro_batch: int
    grad_accum: int
    global_batch: int  # what is actually trained per step: micro * accum * world
    requested_global_batch: int
    lr_scale: float  # linear scaling rule when the global batch had to move
    reason: str

    @property
    def deviation(self) -> int:
        return self.global_batch - self.requested_global_batch

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), deviation=self.deviation)


def plan_batches(global_batch: int, world_size: int, max_micro_batch: int) -> BatchPlan:
    """Split `global_batch` over `world_size` workers with micro-batch <= `max_micro_batch`.

    Rule: the largest micro-batch m <= cap with m * a * W == global_batch exactly. When W does
    not divide the global batch, take the feasible m * a * W nearest to it (ties: the smaller
    global batch, then the larger m), and scale the learning rate by G' / G so the per-sample
    step size is kept (the linear scaling rule, Goyal et al. 2017). The deviation is recorded.
    """
    if world_size < 1 or global_batch < 1:
        raise PlanError(f"world_size ({world_size}) and global_batch ({global_batch}) must be >= 1")
    if max_micro_batch < 1:
        raise PlanError(f"no micro-batch fits: memory cap allows {max_micro_batch}")
    cap = min(max_micro_batch, global_batch)
    if global_batch % world_size == 0:
        per_worker = global_batch // world_size
        for m in range(min(cap, per_worker), 0, -1):
            if per_worker % m == 0:
                return BatchPlan(world_size, m, per_worker // m, global_batch, global_batch, 1.0,
                                 "exact")
    best: tuple[int, int, int, int] | None = None  # (|dev|, G', -m, a)
    for m in range(1, cap + 1):
        for a in {max(1, global_batch // (m * world_size)), -(-global_batch // (m * world_size))}:
            actual = m * a * world_size
            key = (abs(actual - global_batch), actual, -m, a)
            if best is None or key < best:
                best = key
    assert best is not None
    _, actual, neg_m, accum = best
    return BatchPlan(world_size, -neg_m, accum, actual, global_batch, actual / global_batch,
                     f"{world_size} workers cannot split {global_batch} exactly; nearest {actual}")


@dataclass(frozen=True)
class MemoryDecision:
    replan: bool
    new_max_micro_batch: int
    projected_peak_bytes: int
    reason: str


def memory_pressure(peaks_bytes: list[int], budget_bytes: int, micro_batch: int,
                    headroom: float = 0.95, window: int = 5) -> MemoryDecision:
    """Re-plan with a smaller micro-batch when the peak trend will cross the budget.

    The projection is the latest peak plus the recent per-step growth over the next `window`
    steps; a leak or a longer-than-seen batch shows up as growth before it becomes an OOM.
    """
    if not peaks_bytes or micro_batch <= 1:
        return MemoryDecision(False, micro_batch, peaks_bytes[-1] if peaks_bytes else 0, "no data")
    recent = peaks_bytes[-window:]
    growth = max(0.0, (recent[-1] - recent[0]) / max(1, len(recent) - 1))
    projected = int(recent[-1] + growth * window)
    if projected <= budget_bytes * headroom:
        return MemoryDecision(False, micro_batch, projected, "within budget")
    return MemoryDecision(True, max(1, micro_batch // 2), projected,
                          f"projected peak {projected} > {headroom:.0%} of budget {budget_bytes}")


@dataclass(frozen=True)
class ResizeDecision:
    checkpoint_now: bool
    target_world_size: int
    reason: str
    # a grow: have Ray re-read the cluster now; Ray Train's restart then waits for the
    # checkpoint itself (restart_gate.CheckpointBeforeResize)
    refresh_reservations: bool = False


def resize_decision(current_world_size: int, placeable_workers: int, min_workers: int,
                    max_workers: int, draining_workers: int = 0) -> ResizeDecision:
    """What a change in the cluster asks of the controller before Ray Train resizes the group.

    `placeable_workers` is how many more workers the cluster's free resources could start now;
    `draining_workers` how many of the current ones sit on nodes being drained. A drain is
    checkpointed now (the node may go before Ray Train acts); a grow only needs Ray to look.
    """
    target = min(max_workers, current_world_size + placeable_workers) - draining_workers
    target = max(min_workers, min(max_workers, target))
    if draining_workers:
        return ResizeDecision(True, target, f"{draining_workers} worker(s) on draining node(s)")
    if target > current_world_size:
        return ResizeDecision(False, target, f"room for {target - current_world_size} more "
                              "worker(s)", refresh_reservations=True)
    return ResizeDecision(False, current_world_size, "steady")
