"""`Fleet`: the controller's picture of the workers' devices and what it decides from it.

No Ray here: the controller actor feeds it the monitors' samples, each group's rank places and
each step's per-rank measurements, and acts on the decisions it returns. It keeps, per device
(a node's GPU, or a node's CPU share), the memory cap a micro-batch must fit (lowered by memory
pressure or an OOM, for the rest of the run) and the measured compute time per sample.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from elastic_ft.resources.inventory import RankPlace, rank_budget_bytes, rank_device_type
from elastic_ft.resources.planning import (
    RankCost,
    WorkerPlan,
    fit_cost,
    plan_per_worker,
    rebalance_decision,
)
from elastic_ft.resources.policy import memory_pressure

WARMUP_STEPS = 2  # a group's first steps carry start-up work (allocations, stream start)
RESTART_GUESS_S = 30.0  # a group restart, before one is measured (10-17 s on the fake nodes)


@dataclass(frozen=True)
class RankDevice:
    rank: int
    node_id: str
    device_key: str  # the device the rank trains on: "<node>/<gpu ids>" or "<node>/cpu"
    device_type: str
    budget_bytes: int
    cap: int
    cap_source: str

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "node_id": self.node_id, "device": self.device_type,
                "budget_bytes": self.budget_bytes, "cap": self.cap, "cap_source": self.cap_source}


@dataclass(frozen=True)
class Replan:
    """A decision that needs a checkpoint and a new plan (the group restarts)."""

    kind: str  # "memory" | "rebalance"
    reason: str
    event: dict[str, Any] = field(default_factory=dict)


class Fleet:
    def __init__(self, caps: Any, global_batch: int, use_gpu: bool, mem_fraction: float,
                 mem_cap_bytes: int | None, rebalance_threshold: float | None,
                 rebalance_window: int = 5, total_steps: int | None = None,
                 restart_estimate_s: float = RESTART_GUESS_S,
                 max_grad_accum: int | None = None) -> None:
        self.caps = caps  # core.optimizer.MicroBatchCaps (a plain object)
        self.global_batch = global_batch
        self.use_gpu, self.mem_fraction, self.mem_cap_bytes = use_gpu, mem_fraction, mem_cap_bytes
        self.rebalance_threshold = rebalance_threshold  # None: balancing off
        self.window = rebalance_window
        self.max_grad_accum = max_grad_accum  # LOMO: 1 (no accumulation)
        self.samples: dict[str, dict[str, Any]] = {}  # node -> the monitor's newest sample
        self.cap_limits: dict[str, int] = {}  # device -> lowered cap
        # device -> micro-batch -> its compute per micro-step over recent steps
        self.speed: dict[str, dict[int, deque[float]]] = {}
        self.ranks: list[RankDevice] = []
        self.plan: WorkerPlan | None = None
        self.peaks: list[deque[int]] = []
        self.group_steps = 0
        self.total_steps = total_steps
        # what a re-plan restart costs (request -> the new group's first step): a guess until
        # the controller measures one (`restart_measured`)
        self.restart_s = restart_estimate_s
        self.step_s: deque[float] = deque(maxlen=rebalance_window)

    # -- a new group ----------------------------------------------------------------------
    def rank_devices(self, places: list[RankPlace]) -> list[RankDevice]:
        per_node: dict[str, int] = {}
        for p in places:
            per_node[p.node_id] = per_node.get(p.node_id, 0) + 1
        devices = []
        for rank, place in enumerate(places):
            sample = self.samples.get(place.node_id)
            budget = rank_budget_bytes(place, sample, per_node[place.node_id], self.use_gpu,
                                       self.mem_fraction, self.mem_cap_bytes)
            device_type = rank_device_type(place, sample, self.use_gpu)
            key = f"{place.node_id}/{','.join(place.gpu_ids) or 'cpu'}"
            cap, source = self.caps.cap(device_type, budget)
            if key in self.cap_limits and self.cap_limits[key] < cap:
                cap, source = self.cap_limits[key], "lowered after memory pressure or OOM"
            devices.append(RankDevice(rank, place.node_id, key, device_type, budget, cap, source))
        return devices

    def new_group(self, places: list[RankPlace]) -> tuple[WorkerPlan, list[dict[str, Any]]]:
        """This group's plan, and the events to log (caps below the requested micro-batch)."""
        self.ranks = self.rank_devices(places)
        # balancing off: the split follows memory alone
        costs = self._costs() if self.rebalance_threshold is not None else None
        self.plan = plan_per_worker([d.cap for d in self.ranks], self.global_batch, costs=costs,
                                    max_grad_accum=self.max_grad_accum)
        self.peaks = [deque(maxlen=50) for _ in self.ranks]
        self.group_steps = 0
        events = []
        requested = self.caps.requested
        for d in self.ranks:
            if requested is not None and d.cap < requested:
                events.append({"event": "micro_batch_capped", "rank": d.rank,
                               "node_id": d.node_id, "requested": requested, "chosen": d.cap,
                               "budget_bytes": d.budget_bytes, "source": d.cap_source})
        return self.plan, events

    def device_cost(self, device_key: str) -> RankCost | None:
        by_size = {m: statistics.median(v) for m, v in self.speed.get(device_key, {}).items()
                   if v}
        return fit_cost(by_size) if by_size else None

    def _costs(self) -> list[RankCost] | None:
        """Each rank's measured cost; a device not yet measured gets its type's median cost,
        else the median of all. None when nothing is measured yet (alike ranks)."""
        known = {k: c for k in self.speed if (c := self.device_cost(k)) is not None}
        if not known:
            return None

        def median(costs: list[RankCost]) -> RankCost:
            return RankCost(statistics.median(c.fixed_s for c in costs),
                            statistics.median(c.per_sample_s for c in costs))

        by_type: dict[str, list[RankCost]] = {}
        for d in self.ranks:
            if d.device_key in known:
                by_type.setdefault(d.device_type, []).append(known[d.device_key])
        every = median(list(known.values()))
        return [known.get(d.device_key) or (median(by_type[d.device_type])
                                            if d.device_type in by_type else every)
                for d in self.ranks]

    # -- every step ---------------------------------------------------------------------
    def observe(self, rank_mem_bytes: list[int] | None, rank_forward_s: list[float] | None,
                rebalance_allowed: bool = True, step: int | None = None,
                step_s: float | None = None) -> Replan | None:
        """One step's per-rank peaks and compute times: a memory re-plan first (a rank near
        its budget), then a rebalance (one rank much slower than the others) that pays back
        its restart before the run ends."""
        if self.plan is None:
            return None
        self.group_steps += 1
        if step_s and self.group_steps > WARMUP_STEPS:
            self.step_s.append(step_s)
        for r, peak in enumerate(rank_mem_bytes or []):
            if r < len(self.peaks) and peak:
                self.peaks[r].append(int(peak))
        for r, d in enumerate(self.ranks):
            decision = memory_pressure(list(self.peaks[r]), d.budget_bytes,
                                       self.plan.micro_batch(r))
            if decision.replan:
                self.lower_cap(r, decision.new_max_micro_batch)
                return Replan("memory", f"rank {r} ({d.device_type} on "
                                        f"{d.node_id[:8]}): {decision.reason}",
                              {"rank": r, "max_micro_batch": decision.new_max_micro_batch})
        # the compute clock rides one step late: the group's first reading is its step 2
        if rank_forward_s and self.group_steps > WARMUP_STEPS + 1:
            for r, d in enumerate(self.ranks):
                m = self.plan.micro_batch(r)
                if r < len(rank_forward_s) and rank_forward_s[r] > 0:
                    self.speed.setdefault(d.device_key, {}).setdefault(
                        m, deque(maxlen=self.window)).append(
                            rank_forward_s[r] / self.plan.grad_accum)
        # The decision reads window medians: once per window of fresh readings is enough
        # (every step would refit and re-plan in the controller, on the workers' cores).
        measured_steps = self.group_steps - WARMUP_STEPS - 1
        if (self.rebalance_threshold is None or not rebalance_allowed
                or measured_steps < self.window or measured_steps % self.window):
            return None
        now = [self.speed[d.device_key][self.plan.micro_batch(r)]
               for r, d in enumerate(self.ranks)]
        measured = [statistics.median(v) * self.plan.grad_accum for v in now]
        costs = self._costs()
        assert costs is not None
        decision = rebalance_decision(self.plan, measured, costs, self.rebalance_threshold,
                                      self.max_grad_accum)
        if not decision.rebalance or decision.new_plan is None:
            return None
        if step is not None and self.total_steps and self.step_s:
            saving_s = statistics.median(self.step_s) * (1 - 1 / decision.predicted_speedup)
            if saving_s * (self.total_steps - step) <= self.restart_s:
                return None  # the restart would cost more than the run has left to gain
        return Replan("rebalance", decision.reason, {
            "costs": [[round(c.fixed_s, 6), round(c.per_sample_s, 6)] for c in costs],
            "step_s": [round(s, 4) for s in decision.step_s],
            "imbalance": round(decision.imbalance, 3),
            "predicted_speedup": round(decision.predicted_speedup, 3),
            # per node: the next group may number its ranks differently
            "nodes": [d.node_id for d in self.ranks],
            "from": list(self.plan.micro_batches), "to": list(decision.new_plan.micro_batches),
            "grad_accum": decision.new_plan.grad_accum})

    def lower_cap(self, rank: int, new_cap: int) -> int:
        """The rank's device may hold at most `new_cap` from now on (an OOM or the trend)."""
        d = self.ranks[rank]
        cap = max(1, min(new_cap, self.cap_limits.get(d.device_key, new_cap)))
        self.cap_limits[d.device_key] = cap
        return cap
