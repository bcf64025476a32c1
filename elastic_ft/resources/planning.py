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
class WorkerPlan:
    micro_batches: tuple[int, ...]  # rank r trains micro_batches[r] blocks per micro-step
    grad_accum: int  # micro-steps per step, the same on every rank
    global_batch: int  # what is actually trained per step: sum(micro_batches) * grad_accum
    requested_global_batch: int
    lr_scale: float  # linear scaling rule when the global batch had to move
    reason: str
    caps: tuple[int, ...] = ()  # each rank's memory cap on its micro-batch
    weights: tuple[float, ...] = ()  # each rank's relative throughput the split followed

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

    def predicted_step(self, weights: list[float]) -> float:
        """The slowest rank's step time, in units of 1 / weight per sample."""
        return max(m * self.grad_accum / w
                   for m, w in zip(self.micro_batches, weights, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), world_size=self.world_size, deviation=self.deviation,
                    shares=[m * self.grad_accum for m in self.micro_batches])

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WorkerPlan:
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        for key in ("micro_batches", "caps", "weights"):
            fields[key] = tuple(fields.get(key, ()))
        return cls(**fields)


def split_slots(slots: int, caps: list[int], weights: list[float]) -> list[int]:
    """`slots` micro-batch slots over ranks, each at least 1 and at most its cap, minimising
    the slowest rank's time (m_r / w_r): water-filling, one slot at a time to the rank that
    would finish first with it (ties: the lower rank)."""
    m = [1] * len(caps)
    heap = [((1 + 1) / w, r) for r, w in enumerate(weights) if caps[r] > 1]
    heapq.heapify(heap)
    for _ in range(slots - len(caps)):
        _, r = heapq.heappop(heap)
        m[r] += 1
        if m[r] < caps[r]:
            heapq.heappush(heap, ((m[r] + 1) / weights[r], r))
    return m


def plan_per_worker(caps: list[int], global_batch: int,
                    weights: list[float] | None = None) -> WorkerPlan:
    """Split `global_batch` over ranks with memory caps `caps` (max micro-batch per rank) and
    relative throughputs `weights` (samples/s; equal when None).

    Rule: a shared accumulation `a` dividing the global batch whose `G / a` slots fit the caps
    (at least one per rank), the slots placed where the step finishes soonest; the smallest
    such `a`, unless measured speeds predict a larger one faster (a capped fast rank). When no
    `a` splits the global batch exactly (the caps are too small, or fewer slots than ranks),
    take the feasible `M * a` nearest to it (ties: the smaller, then fewer micro-steps) and
    scale the learning rate by G' / G (the linear scaling rule, Goyal et al. 2017), recorded.
    """
    world = len(caps)
    if world < 1 or global_batch < 1:
        raise PlanError(f"world_size ({world}) and global_batch ({global_batch}) must be >= 1")
    if min(caps) < 1:
        raise PlanError(f"no micro-batch fits: memory caps allow {list(caps)}; lower "
                        "data.seq_len, use LoRA or a higher ZeRO stage, or add memory")
    w = [1.0] * world if weights is None else [max(1e-9, float(x)) for x in weights]
    if len(w) != world:
        raise PlanError(f"{len(w)} weights for {world} ranks")
    capped = [min(c, global_batch) for c in caps]
    room = sum(capped)

    def plan(slots: int, accum: int, reason: str) -> WorkerPlan:
        actual = slots * accum
        return WorkerPlan(tuple(split_slots(slots, capped, w)), accum, actual, global_batch,
                          actual / global_batch, reason, tuple(caps), tuple(w))

    exact = [plan(global_batch // accum, accum, "exact") for accum in range(1, global_batch + 1)
             if global_batch % accum == 0 and world <= global_batch // accum <= room]
    if exact:
        if weights is None:  # alike ranks: the fewest micro-steps (the largest micro-batches)
            return exact[0]
        # Measured speeds: more micro-steps can let a capped fast rank take a larger share.
        # The model counts samples, not the fixed cost of a micro-step, so a larger
        # accumulation must be predicted more than 10% faster to be chosen.
        fastest = min(p.predicted_step(w) for p in exact)
        return next(p for p in exact if p.predicted_step(w) <= fastest * 1.1)
    best: tuple[int, int, int, int] | None = None  # (|dev|, G', a, M)
    for accum in range(1, global_batch + 1):
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
    step_s: tuple[float, ...] = ()  # each rank's measured compute time per step
    imbalance: float = 0.0  # slowest / fastest - 1
    predicted_speedup: float = 1.0  # current slowest rank's time / the new split's
    new_plan: WorkerPlan | None = None


def rebalance_decision(plan: WorkerPlan, seconds_per_sample: list[float | None],
                       threshold: float) -> RebalanceDecision:
    """Re-split the global batch in proportion to measured throughput when the slowest rank's
    compute per step exceeds the fastest's by more than `threshold`, and only when the new
    split is predicted to be faster by more than `threshold` too: integer micro-batches leave
    a residual imbalance that no split removes, and a micro-batch's fixed cost makes small
    ones look slow per sample; chasing either restarted the group for 5-9% (measured on the
    fake-node benchmark), which a restart does not pay back.
    """
    if len(seconds_per_sample) != plan.world_size or any(
            s is None or s <= 0 for s in seconds_per_sample):
        return RebalanceDecision(False, "not every rank measured yet")
    per_sample = [float(s) for s in seconds_per_sample if s is not None]
    step_s = tuple(m * plan.grad_accum * s for m, s in zip(plan.micro_batches, per_sample, strict=True))
    imbalance = max(step_s) / max(1e-12, min(step_s)) - 1
    if imbalance <= threshold:
        return RebalanceDecision(False, f"imbalance {imbalance:.0%} within {threshold:.0%}",
                                 step_s, imbalance)
    caps = list(plan.caps) if plan.caps else [plan.requested_global_batch] * plan.world_size
    new = plan_per_worker(caps, plan.requested_global_batch, [1 / s for s in per_sample])
    new_step_s = max(m * new.grad_accum * s for m, s in zip(new.micro_batches, per_sample, strict=True))
    speedup = max(step_s) / max(1e-12, new_step_s)
    if new.micro_batches == plan.micro_batches or speedup - 1 <= threshold:
        return RebalanceDecision(False, f"imbalance {imbalance:.0%}, but no split within the "
                                        f"caps is faster (best {speedup:.2f}x)",
                                 step_s, imbalance, speedup)
    return RebalanceDecision(True, f"imbalance {imbalance:.0%} > {threshold:.0%}; the new split "
                                   f"is predicted {speedup:.2f}x faster",
                             step_s, imbalance, speedup, new)
