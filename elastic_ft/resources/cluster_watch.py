"""The controller's cluster picture: nodes joining, leaving and draining, one `ResourceMonitor`
per node (its samples are the node inventory), cloud notices, and what a change in the
cluster asks of the running group (`policy.resize_decision`).

A mixin of `ElasticController` (controller.py), which holds the state it reads: the events,
the fleet, the current group's world size and nodes, and the pending request.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from elastic_ft.resources.inventory import inventory_row
from elastic_ft.resources.policy import resize_decision
from elastic_ft.resources.preemption import drain_noticed_node
from elastic_ft.resources.recovery import NODE_ALIVE
from elastic_ft.resources.reservations import find_coordinator, refresh_ray_reservations


class ClusterWatch:
    events: Any
    fleet: Any
    world_size: int | None
    pending: dict[str, Any] | None
    _lock: threading.Lock
    _requested: threading.Condition  # on _lock; the workers' poll waits on it
    clock_marks: list[tuple[str, float]]  # the controller's, for recovery timelines
    _top_up_spares_soon: Any  # warm_pool.SpareKeeper's
    _forget_spares_on: Any

    def _request(self, request: dict[str, Any]) -> None:
        """Hold the lock: `request` is what the workers' next (or waiting) poll answers."""
        self.pending = request
        self._requested.notify_all()

    def node_sample(self, sample: dict[str, Any]) -> None:
        node_id = sample["node_id"]
        with self._lock:
            self.fleet.samples[node_id] = sample
            joined = node_id in self.joined
            self.joined.discard(node_id)
        if joined:  # a node that joined the run: its inventory with the event
            self.events.emit("node_join", **inventory_row(sample))

    def set_caps(self, caps: Any) -> None:
        """The driver's micro-batch caps per device (core.optimizer.MicroBatchCaps), sized
        from this controller's inventory before the first group starts."""
        self.fleet.caps = caps

    def samples(self) -> dict[str, dict[str, Any]]:
        return dict(self.fleet.samples)

    def inventory(self) -> list[dict[str, Any]]:
        """The nodes alive now, as their monitors last described them."""
        return [inventory_row(self.fleet.samples[n]) for n in sorted(self.nodes)
                if n in self.fleet.samples]

    def preemption_notice(self, node_id: str, notice: dict[str, Any]) -> None:
        """A cloud metadata notice from a node's monitor, or a SIGTERM to a worker: Ray is
        told to drain the node (`drain_noticed_node`), and it is handled as a Ray drain."""
        deadline_s = notice.get("deadline_s")  # unix time, as Ray's drain deadlines
        deadline_ms = int(deadline_s * 1000) if deadline_s else 0
        self.noticed[node_id] = deadline_ms
        ray_drain = node_id not in self.draining and drain_noticed_node(
            node_id, deadline_ms, f"elastic_ft: {notice['source']} notice: {notice['detail']}")
        self.events.emit("preemption_notice", node_id=node_id, source=notice["source"],
                         cloud=notice["kind"], deadline_s=deadline_s, detail=notice["detail"],
                         ray_drain=ray_drain)
        self._watch_nodes()

    def request_checkpoint(self, kind: str, restart: bool, reason: str) -> None:
        with self._lock:
            if self.pending is None:
                self._request({"kind": kind, "restart": restart, "reason": reason})
        self.events.emit("jit_checkpoint_requested", kind=kind, reason=reason)

    def _placeable_workers(self) -> int:
        import ray

        need = self.resources_per_worker or {"CPU": 1}
        free = ray._private.state.available_resources_per_node()
        count = 0
        for node_id, avail in free.items():
            if node_id not in self.nodes or node_id in self.draining:
                continue
            count += int(min(avail.get(k, 0.0) / v for k, v in need.items() if v > 0))
        return count

    def _watch_nodes(self, initial: bool = False) -> None:
        import ray

        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for node_id in sorted(alive - self.nodes):
            if not initial:  # node_join is logged with the monitor's first sample
                self.joined.add(node_id)
                self.clock_marks.append((NODE_ALIVE, time.time()))  # the join's timeline
            self._start_monitor(node_id)
        for node_id in sorted(self.nodes - alive):
            self.events.emit("node_lost", node_id=node_id)
            self.monitors.pop(node_id, None)
            self._forget_spares_on(node_id)
        if not initial and alive - self.nodes:
            self._top_up_spares_soon()  # a joined node gets its spares before the grow
        self.nodes = alive
        draining = dict(ray._private.state.state.get_draining_nodes())
        for node_id, deadline_ms in draining.items():
            # once per node, when Ray first reports it: a node noticed by a cloud or SIGTERM is
            # in self.draining from the notice on, before Ray reports the drain it was asked
            if node_id not in self.ray_draining:
                self.events.emit("node_draining", node_id=node_id, deadline_ms=deadline_ms)
        self.ray_draining = set(draining)
        self.draining = {**draining, **{n: d for n, d in self.noticed.items() if n in alive}}
        if (initial or self.world_size is None or self.pending
                or time.time() < self.resize_hold_until):
            return
        hosting_nodes = set(self.draining) & getattr(self, "worker_nodes", set())
        decision = resize_decision(self.world_size, self._placeable_workers(), self.min_workers,
                                   self.max_workers, draining_workers=len(hosting_nodes))
        if decision.refresh_reservations and self.refreshed_for != (
                self.world_size, decision.target_world_size):
            self.refreshed_for = (self.world_size, decision.target_world_size)
            self.events.emit("reservations_refreshed", reason=decision.reason,
                             done=refresh_ray_reservations())
        if not decision.checkpoint_now or not self.jit_on_resize:
            return
        self._warn_if_deadline_too_short(hosting_nodes)
        kind = "preemption" if hosting_nodes & set(self.noticed) else "drain"
        self.request_checkpoint(kind, restart=True, reason=decision.reason)

    def _warn_if_deadline_too_short(self, nodes: set[str]) -> None:
        deadlines_ms = [self.draining[n] for n in nodes if self.draining[n] > 0]
        if not deadlines_ms or self.last_checkpoint_s is None:
            return
        left_s = min(deadlines_ms) / 1000 - time.time()
        if left_s < self.last_checkpoint_s:
            self.events.emit("warning", message=(
                f"preemption deadline in {left_s:.1f} s is shorter than the last checkpoint "
                f"({self.last_checkpoint_s:.1f} s); checkpointing anyway"))

    def _start_monitor(self, node_id: str) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from elastic_ft.resources.monitor import ResourceMonitor

        actor = ray.remote(num_cpus=0)(ResourceMonitor).options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            max_restarts=0,
        ).remote(node_id, ray.get_runtime_context().current_actor, self.monitor_interval_s,
                 self.preemption_urls, self.preemption_poll_s)
        self.monitors[node_id] = actor

    def _watch_loop(self) -> None:
        find_coordinator()
        while not self._stop.wait(self.monitor_interval_s):
            try:
                self._watch_nodes()
            except Exception as error:  # the GCS may be briefly unreachable while nodes churn
                self.events.emit("monitor_error", error=repr(error))

