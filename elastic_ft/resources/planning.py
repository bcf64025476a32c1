"""Per-worker batch plans and load balancing: pure decisions, no Ray.

A plan gives every rank its own micro-batch `m_r` and one accumulation count `a` shared by all
ranks, with `sum_r m_r * a == global_batch`. The accumulation is shared on purpose: DeepSpeed
reduces (ZeRO-2) or gathers (ZeRO-3) on every micro-step, so every rank must run the same
number of them, or the collectives deadlock. Unequal devices are served by unequal micro-batch
sizes instead, which every ZeRO stage accepts. The loss is normalised by the global batch's
token count (core/train_loop.py), so each step minimises the same token mean whatever the split.
"""

from __future__ import annotations

import heapq
from dataclasses import asdict, dataclass
from typing import Any


class PlanError(ValueError):
    """No micro-batch of at least 1 fits."""


@dataclass(frozen=True)
class RankCost:
    """A rank's compute per micro-step at micro-batch m: `fixed_s + per_sample_s * m`. The
    fixed part (kernel launches, hooks, a small batch's poor use of the device) is why the
    time per sample measured at one size misleads at another."""

    fixed_s: float
    per_sample_s: float

    def micro_step_s(self, micro_batch: int) -> float:
        return self.fixed_s + self.per_sample_s * micro_batch


def fit_cost(seconds_by_micro_batch: dict[int, float]) -> RankCost:
    """A device's cost from its measured compute per micro-step at each micro-batch size it
    trained: all per sample from one size, a least-squares line from sizes at least 1.5x
    apart (a line through 6 and 8 was mostly noise on the fake-node benchmark)."""
    points = sorted((m, t) for m, t in seconds_by_micro_batch.items() if t > 0)
    if not points:
        raise ValueError("no measurement")
    largest_m, largest_t = points[-1]
    if len(points) == 1 or largest_m < 1.5 * points[0][0]:
        return RankCost(0.0, largest_t / largest_m)
    mean_m = sum(m for m, _ in points) / len(points)
    mean_t = sum(t for _, t in points) / len(points)
    var = sum((m - mean_m) ** 2 for m, _ in points)
    slope = sum((m - mean_m) * (t - mean_t) for m, t in points) / var
    if slope <= 0:  # noise swamps the sizes' difference: take the largest size's rate
        return RankCost(0.0, largest_t / largest_m)
    fixed = max(0.0, min(mean_t - slope * mean_m, min(t for _, t in points)))
    return RankCost(fixed, slope)


def costs_from_weights(weights: list[float]) -> list[RankCost]:
    return [RankCost(0.0, 1.0 / max(1e-9, float(w))) for w in weights]


@dataclass(frozen=True)
class WorkerPlan:
    micro_batches: tuple[int, ...]  # rank r trains micro_batches[r] blocks per micro-step
    grad_accum: int  # micro-steps per step, the same on every rank
    global_batch: int  # what is actually trained per step: sum(micro_batches) * grad_accum
    requested_global_batch: int
    lr_scale: float  # linear scaling rule when the global batch had to move
    reason: str
    caps: tuple[int, ...] = ()  # each rank's memory cap on its micro-batch
    costs: tuple[tuple[float, float], ...] = ()  # each rank's (fixed_s, per_sample_s) used

    @property
    def world_size(self) -> int:
        return len(self.micro_batches)

    @property
    def deviation(self) -> int:
        return self.global_batch - self.requested_global_batch

    @property
    def even(self) -> bool:
        return len(set(self.micro_batches)) == 1

    def micro_batch(self, rank: int) -> int:
        return self.micro_batches[rank]

    def predicted_step(self, costs: list[RankCost]) -> float:
        """The slowest rank's compute per step under `costs`."""
        return self.grad_accum * max(c.micro_step_s(m)
                                     for m, c in zip(self.micro_batches, costs, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), world_size=self.world_size, deviation=self.deviation,
                    shares=[m * self.grad_accum for m in self.micro_batches])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WorkerPlan:
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        for key in ("micro_batches", "caps"):
            fields[key] = tuple(fields.get(key, ()))
        fields["costs"] = tuple(tuple(c) for c in fields.get("costs", ()))
        return cls(**fields)


def split_slots(slots: int, caps: list[int], costs: list[RankCost]) -> list[int]:
    """`slots` micro-batch slots over ranks, each at least 1 and at most its cap, minimising
    the slowest rank's time: water-filling, one slot at a time to the rank that would finish
    first with it (ties: the lower rank). Optimal for non-decreasing costs."""
    m = [1] * len(caps)
    heap = [(c.micro_step_s(2), r) for r, c in enumerate(costs) if caps[r] > 1]
    heapq.heapify(heap)
    for _ in range(slots - len(caps)):
        _, r = heapq.heappop(heap)
        m[r] += 1
        if m[r] < caps[r]:
            heapq.heappush(heap, (costs[r].micro_step_s(m[r] + 1), r))
    return m


def plan_per_worker(caps: list[int], global_batch: int, weights: list[float] | None = None,
                    costs: list[RankCost] | None = None,
                    max_grad_accum: int | None = None) -> WorkerPlan:
    """Split `global_batch` over ranks with memory caps `caps` (max micro-batch per rank) and
    measured `costs` per micro-step, or relative throughputs `weights` (samples/s); alike
    ranks when neither is given.

    Rule: a shared accumulation `a` dividing the global batch whose `G / a` slots fit the caps
    (at least one per rank), the slots placed where the step finishes soonest; the smallest
    such `a`, unless measured speeds predict a larger one faster (a capped fast rank). When no
    `a` splits the global batch exactly (the caps are too small, or fewer slots than ranks),
    take the feasible `M * a` nearest to it (ties: the smaller, then fewer micro-steps) and
    scale the learning rate by G' / G (the linear scaling rule, Goyal et al. 2017), recorded.
    `max_grad_accum` bounds `a` (LOMO: 1, its update is fused into the one backward).
    """
    world = len(caps)
    if world < 1 or global_batch < 1:
        raise PlanError(f"world_size ({world}) and global_batch ({global_batch}) must be >= 1")
    if min(caps) < 1:
        raise PlanError(f"no micro-batch fits: memory caps allow {list(caps)}; lower "
                        "data.seq_len, use LoRA or a higher ZeRO stage, or add memory")
    measured = costs is not None or weights is not None
    cost = list(costs) if costs is not None else costs_from_weights(weights or [1.0] * world)
    if len(cost) != world:
        raise PlanError(f"{len(cost)} costs for {world} ranks")
    capped = [min(c, global_batch) for c in caps]
    room = sum(capped)

    def plan(slots: int, accum: int, reason: str) -> WorkerPlan:
        actual = slots * accum
        return WorkerPlan(tuple(split_slots(slots, capped, cost)), accum, actual, global_batch,
                          actual / global_batch, reason, tuple(caps),
                          tuple((c.fixed_s, c.per_sample_s) for c in cost) if measured else ())

    accums = range(1, min(global_batch, max_grad_accum or global_batch) + 1)
    exact = [plan(global_batch // accum, accum, "exact") for accum in accums
             if global_batch % accum == 0 and world <= global_batch // accum <= room]
    if exact:
        if not measured:  # alike ranks: the fewest micro-steps (the largest micro-batches)
            return exact[0]
        # Measured speeds: more micro-steps can let a capped fast rank take a larger share.
        # A cost measured at one size may miss a micro-step's fixed part, so a larger
        # accumulation must be predicted more than 10% faster to be chosen.
        fastest = min(p.predicted_step(cost) for p in exact)
        return next(p for p in exact if p.predicted_step(cost) <= fastest * 1.1)
    best: tuple[int, int, int, int] | None = None  # (|dev|, G', a, M)
    for accum in accums:
        for slots in {global_batch // accum, -(-global_batch // accum)}:
            slots = max(world, min(room, slots))
            actual = slots * accum
            key = (abs(actual - global_batch), actual, accum, slots)
            if best is None or key < best:
                best = key
    assert best is not None
    _, actual, accum, slots = best
    return plan(slots, accum, f"{world} workers with caps {list(caps)} cannot split "
                              f"{global_batch} exactly; nearest {actual}")


def plan_batches(global_batch: int, world_size: int, max_micro_batch: int) -> WorkerPlan:
    """The plan for `world_size` alike workers (the `plan` command, benchmarks)."""
    return plan_per_worker([max_micro_batch] * world_size, global_batch)


@dataclass(frozen=True)
class RebalanceDecision:
    rebalance: bool
    reason: str
    step_s: tuple[float, ...] = ()  # each rank's measured compute per step
    imbalance: float = 0.0  # slowest / fastest - 1
    predicted_speedup: float = 1.0  # the current split's slowest rank / the new split's
    new_plan: WorkerPlan | None = None


def rebalance_decision(plan: WorkerPlan, measured_step_s: list[float | None],
                       costs: list[RankCost], threshold: float,
                       max_grad_accum: int | None = None) -> RebalanceDecision:
    """Re-split the global batch by measured speed when the slowest rank's compute per step
    (`measured_step_s`, at the current split) exceeds the fastest's by more than `threshold`,
    and only when the split that `costs` predict best is faster by more than `threshold` too:
    integer micro-batches leave a residual imbalance that no split removes, and chasing 5-9%
    gains restarted the group more often than it paid back (measured on the fake-node
    benchmark)."""
    if len(measured_step_s) != plan.world_size or any(
            s is None or s <= 0 for s in measured_step_s):
        return RebalanceDecision(False, "not every rank measured yet")
    step_s = tuple(float(s) for s in measured_step_s if s is not None)
    imbalance = max(step_s) / max(1e-12, min(step_s)) - 1
    if imbalance <= threshold:
        return RebalanceDecision(False, f"imbalance {imbalance:.0%} within {threshold:.0%}",
                                 step_s, imbalance)
    caps = list(plan.caps) if plan.caps else [plan.requested_global_batch] * plan.world_size
    new = plan_per_worker(caps, plan.requested_global_batch, costs=costs,
                          max_grad_accum=max_grad_accum)
    speedup = plan.predicted_step(costs) / max(1e-12, new.predicted_step(costs))
    if new.micro_batches == plan.micro_batches or speedup - 1 <= threshold:
        return RebalanceDecision(False, f"imbalance {imbalance:.0%}, but no split within the "
                                        f"caps is predicted faster (best {speedup:.2f}x)",
                                 step_s, imbalance, speedup)
    return RebalanceDecision(True, f"imbalance {imbalance:.0%} > {threshold:.0%}; the new split "
                                   f"is predicted {speedup:.2f}x faster",
                             step_s, imbalance, speedup, new)
