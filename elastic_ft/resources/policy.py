"""Pure decisions of the elastic controller: resize and memory-pressure reactions (batch plans:
`planning.py`).

Shaped like Ray Train V2's scaling/failure policies: plain inputs in, a frozen decision
dataclass out, no Ray, so every rule is unit-tested over many world sizes and caps.
"""

from __future__ import annotations

from dataclasses import dataclass


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
