"""Warm spare processes: a restart's new ranks start in processes that did their imports ahead.

Every worker group Ray Train starts is new actors, and each actor is a worker process: on the
benchmark machine 6-10 s to start one and set up Ray Train's context in it, then 4-7 s of
imports in the training function (DeepSpeed, transformers, PEFT), on every restart (the
`recovery` events' `new_workers_started` and `model_loaded` phases). Ray's raylet hands an
actor an idle worker process of the same job and runtime environment before it starts a new
one, and its `PrestartWorkers` call starts such processes ahead (exempt from idle-killing for a
keep-alive). So the controller keeps, on each node that can host ranks, one idle process per
rank it can host with the training workers' exact runtime environment ("spares"): each runs the
job's worker setup hook (worker_setup.py), which, seeing `WARM_ENV` (set only in the training
workers' runtime environment), imports what a rank imports, then lists itself as ready in Ray's
GCS key-value store. The next group's actors start in them (`warm_ranks` in the `recovery`
events: ranks in a listed spare, or in a process older than the group on a node with a spare
asked for, which may still have been warming).

The runtime environment is the string rank 0 reports (Ray's own serialisation, so the raylet's
hash matches); the job is the controller's own. Spares exit by themselves once the controller
is gone (the run ended) while they are still idle.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WARM_ENV = "ELASTIC_FT_WARM"
# idle spares are exempt from the raylet's idle-worker killing this long (they exit with the run)
KEEP_ALIVE_S = 24 * 3600
# a spare asked for but not ready after this long is counted as never started
STARTING_TIMEOUT_S = 120.0
# what a rank imports before its first step, beyond DeepSpeed (lean_imports.import_deepspeed)
RANK_MODULES = ("torch.distributed", "ray.train", "ray.train.torch", "ray.data",
                "transformers", "peft", "elastic_ft.core.train_loop", "elastic_ft.core.engine",
                "elastic_ft.core.evaluate", "elastic_ft.core.model", "elastic_ft.core.step",
                "elastic_ft.resources.replan_restart")


def warm_modules(model_type: str | None) -> list[str]:
    """The modules a spare imports: a rank's, and the model's own (transformers loads it
    lazily, on the first from_pretrained)."""
    modules = list(RANK_MODULES)
    if model_type:
        modules.append(f"transformers.models.{model_type}.modeling_{model_type}")
    return modules


def model_type_of(model_path: str) -> str | None:
    """A local model's `model_type` (config.json); None for a hub id or no config."""
    try:
        return str(json.loads((Path(model_path) / "config.json").read_text())["model_type"])
    except (OSError, ValueError, KeyError):
        return None


def warm_env_vars(controller_name: str, namespace: str, accelerator: str,
                  modules: list[str]) -> dict[str, str]:
    """The training workers' runtime-environment variable that makes a process warm itself."""
    return {WARM_ENV: json.dumps({"controller": controller_name, "namespace": namespace,
                                  "accelerator": accelerator, "modules": modules},
                                 sort_keys=True)}


def node_slots(total: dict[str, float], per_worker: dict[str, float], cap: int) -> int:
    """How many ranks a node can host by its total resources (at most `cap`)."""
    need = {k: v for k, v in per_worker.items() if v > 0}
    if not need:
        return 0
    return max(0, min(cap, *(int(total.get(k, 0.0) // v) for k, v in need.items())))


def spare_prefix(controller_name: str) -> str:
    """Where a run's ready spares are listed in Ray's GCS key-value store: one key per spare,
    PREFIX + node + "/" + pid. (A process that has run no task cannot call an actor: Ray's
    core worker has no job runtime environment yet to submit with.)"""
    return f"elastic_ft/spares/{controller_name}/"


def spare_key(prefix: str, node_id: str, pid: int | str = "") -> str:
    """A spare's key under `prefix`; without a pid, the prefix of all of a node's spares."""
    return f"{prefix}{node_id}/{pid}"


def parse_spare_keys(keys: list[bytes], prefix: str) -> set[tuple[str, int]]:
    out = set()
    for key in keys:
        node_id, _, pid = key.decode()[len(prefix):].partition("/")
        if pid.isdigit():
            out.add((node_id, int(pid)))
    return out


@dataclass
class SparePool:
    """The controller's book of spares: requests not yet answered, by node, and the listed
    spares already matched to a request."""

    runtime_env: str | None = None  # rank 0's serialised runtime environment
    starting: dict[str, list[float]] = field(default_factory=dict)  # node -> request times
    seen: set[tuple[str, int]] = field(default_factory=set)  # listed, matched to a request

    def _answer(self, node_id: str) -> None:
        pending = self.starting.get(node_id)
        if pending:
            pending.pop(0)

    def orders(self, slots: dict[str, int], ready: set[tuple[str, int]],
               now: float) -> dict[str, int]:
        """Spares to start per node: its slots less those ready or still warming (a request
        not answered within STARTING_TIMEOUT_S counts as never started: the raylet starts a
        spare only on a free CPU)."""
        for node_id, pid in sorted(ready - self.seen):  # each new one answers a request
            self._answer(node_id)
            self.seen.add((node_id, pid))
        self.seen &= ready
        out = {}
        for node_id, want in slots.items():
            pending = [t for t in self.starting.get(node_id, []) if now - t < STARTING_TIMEOUT_S]
            self.starting[node_id] = pending
            have = sum(1 for n, _ in ready if n == node_id) + len(pending)
            if want > have:
                out[node_id] = want - have
                pending.extend([now] * (want - have))
        return out

    def claim(self, node_id: str, pid: int, listed: bool, older_than_group: bool) -> bool:
        """A rank of a new group runs in (node, pid); `listed`: that process was listed as a
        spare. True when it is a spare: listed, or older than the group on a node with a
        request outstanding (a spare still warming when the group came)."""
        if (node_id, pid) in self.seen:
            self.seen.discard((node_id, pid))
            return True
        if listed or (older_than_group and self.starting.get(node_id)):
            self._answer(node_id)
            return True
        return False

    def forget_node(self, node_id: str) -> None:
        self.starting.pop(node_id, None)
        self.seen = {s for s in self.seen if s[0] != node_id}


def prestart(node: dict[str, Any], job_id_hex: str, runtime_env: str, count: int) -> None:
    """Ask a node's raylet to start `count` idle worker processes for this job and runtime
    environment (its NodeManagerService.PrestartWorkers; Ray's own gRPC channel carries the
    cluster's auth token and TLS settings)."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc
    from ray.core.generated.runtime_environment_pb2 import RuntimeEnvInfo

    channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
            node_manager_pb2.PrestartWorkersRequest(
                language=common_pb2.PYTHON, job_id=bytes.fromhex(job_id_hex),
                runtime_env_info=RuntimeEnvInfo(serialized_runtime_env=runtime_env),
                keep_alive_duration_secs=KEEP_ALIVE_S, num_workers=count), timeout=10)
    finally:
        channel.close()


class SpareKeeper:
    """The controller's side (a mixin of `ElasticController`): count the ranks that started in
    a spare, keep each node's spares up after a group's first step and at a join."""

    events: Any
    draining: dict[str, int]
    resources_per_worker: dict[str, float]
    max_workers: int
    _lock: Any
    spares: SparePool | None = None
    spare_prefix: str = ""

    def set_warm_spares(self, controller_name: str | None) -> None:
        """None: no spares; else the name the spares' keys are listed under."""
        self.spares = SparePool() if controller_name else None
        self.spare_prefix = spare_prefix(controller_name or "")

    def _claim_spares(self, places: list[dict[str, Any]], scheduled_t: float | None) -> int:
        """At a group's plan: how many of its ranks started in a spare (listed as one, or
        older than the group: Ray Train asked for it at `scheduled_t`, and a spare may still
        have been warming); their keys go. The top-up waits for the group's first step
        (`group_ready`): warming spares would take CPU from the restart itself."""
        if self.spares is None:
            return 0
        from ray.experimental.internal_kv import _internal_kv_del

        spare_ranks = 0
        for place in places:
            node_id, pid = place["node_id"], int(place["pid"])
            listed = _internal_kv_del(spare_key(self.spare_prefix, node_id, pid)) > 0
            started_t = place.get("process_started_t")
            older = scheduled_t is not None and started_t is not None and started_t < scheduled_t
            with self._lock:
                spare_ranks += self.spares.claim(node_id, pid, listed, older)
        with self._lock:
            self.spares.runtime_env = places[0].get("runtime_env") or self.spares.runtime_env
        return spare_ranks

    def _forget_spares_on(self, node_id: str) -> None:
        """A node that left: its spares went with it."""
        if self.spares is None:
            return
        from ray.experimental.internal_kv import _internal_kv_del

        with self._lock:
            self.spares.forget_node(node_id)
        _internal_kv_del(spare_key(self.spare_prefix, node_id), del_by_prefix=True)

    def _top_up_spares_soon(self) -> None:
        if self.spares is not None and self.spares.runtime_env is not None:
            threading.Thread(target=self._top_up_spares, daemon=True).start()

    def _top_up_spares(self) -> None:
        import ray
        from ray.experimental.internal_kv import _internal_kv_list

        assert self.spares is not None and self.spares.runtime_env is not None
        nodes = {n["NodeID"]: n for n in ray.nodes()
                 if n["Alive"] and n["NodeID"] not in self.draining}
        per_worker = self.resources_per_worker or {"CPU": 1}
        slots = {node_id: node_slots(node.get("Resources", {}), per_worker, self.max_workers)
                 for node_id, node in nodes.items()}
        ready = parse_spare_keys(_internal_kv_list(self.spare_prefix), self.spare_prefix)
        with self._lock:
            orders = self.spares.orders(slots, ready, time.time())
            runtime_env = self.spares.runtime_env
        job_id = ray.get_runtime_context().get_job_id()
        for node_id, count in orders.items():
            try:
                prestart(nodes[node_id], job_id, runtime_env, count)
            except Exception as error:  # a node going away: its ranks start cold, as before
                self.events.emit("warning", message=f"warm spares not started on {node_id}: "
                                                    f"{error!r}"[:300])
                orders[node_id] = 0
        if any(orders.values()):
            self.events.emit("warm_spares_requested", nodes=orders,
                             ready=sorted(node_id for node_id, _ in ready))

    def _forget_spares_of_run(self) -> None:
        """At shutdown: the spares exit by themselves once the controller is gone."""
        if self.spares is not None:
            from ray.experimental.internal_kv import _internal_kv_del

            _internal_kv_del(self.spare_prefix, del_by_prefix=True)
