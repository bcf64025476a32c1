"""A multi-node Ray cluster on one machine, for elastic tests, chaos runs and benchmarks.

`ray.cluster_utils.Cluster` starts a head plus fake worker nodes (separate raylets). Each
fake node gets 2 CPUs and one `trainer` resource: exactly one training worker ({CPU: 1,
trainer: 1}) fits per node, so removing a node removes a worker, and the node has a CPU beyond
its rank's, as a GPU node has (Ray's raylet starts a warm spare only on a free CPU). Node loss
comes in three kinds: `remove_node(hard=True)` (no warning), `drain_node(...)` (Ray's
preemption drain with a deadline, what a cloud autoscaler sends) and a plain graceful removal.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TRAINER_RESOURCE = "trainer"
WORKER_RESOURCES = {"CPU": 1, TRAINER_RESOURCE: 1}


class FakeNodeCluster:
    def __init__(self, num_nodes: int = 2, head_cpus: int = 2,
                 head_labels: dict[str, str] | None = None,
                 training_health_check: bool = True) -> None:
        """`training_health_check`: the head declares a lost node dead as the shipped cluster
        configs do (resources/node_health.py); False keeps Ray's defaults."""
        import ray
        from ray.cluster_utils import Cluster

        from elastic_ft.resources import node_health, worker_setup

        if ray.is_initialized():
            ray.shutdown()
        head: dict[str, Any] = {"num_cpus": head_cpus, "include_dashboard": False,
                                "labels": head_labels or {}}
        if training_health_check:
            head["_system_config"] = dict(node_health.SYSTEM_CONFIG)
        self.cluster = Cluster(initialize_head=True, head_node_args=head)
        self.nodes: list[Any] = [self.add_node() for _ in range(num_nodes)]
        ray.init(address=self.cluster.address, log_to_driver=False,
                 runtime_env=worker_setup.RUNTIME_ENV)

    def add_node(self, env_vars: dict[str, str] | None = None,
                 labels: dict[str, str] | None = None) -> Any:
        """Main thread only: Ray's node start installs signal handlers. `env_vars` reach
        every process of that node only (its own cloud metadata endpoint, or the documented
        fault injection: ELASTIC_FT_NODE_MEM_BUDGET_BYTES, ELASTIC_FT_FAULT_SLOWDOWN, ...);
        `labels` are its Ray node labels (ray.io/market-type, ray.io/accelerator-type)."""
        node = self.cluster.add_node(num_cpus=2, resources={TRAINER_RESOURCE: 1},
                                     env_vars=env_vars, labels=labels or {})
        self.cluster.wait_for_nodes()
        if hasattr(self, "nodes"):
            self.nodes.append(node)
        return node

    def remove_node(self, node: Any | None = None, hard: bool = False) -> Any:
        node = node or self.nodes[-1]
        self.nodes.remove(node)
        self.cluster.remove_node(node, allow_graceful=not hard)
        return node

    def drain_node(self, node: Any, deadline_s: float, reason: str = "preemption") -> None:
        """Ray's own drain notice (what the autoscaler sends before a spot node goes)."""
        from elastic_ft.resources.preemption import request_ray_drain

        accepted, message = request_ray_drain(
            node.node_id, int((time.time() + deadline_s) * 1000), "elastic_ft fake-node drain",
            reason, gcs_address=self.cluster.address)
        if not accepted:
            raise RuntimeError(f"drain of {node.node_id} rejected: {message}")

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        try:
            self.cluster.shutdown()
        except AttributeError:  # Ray's Cluster trips over a node removed earlier
            pass


class BackgroundRun:
    """`run_training` in a side thread, so the main thread can add nodes (signal handlers)."""

    def __init__(self, cfg: Any, export: bool = False) -> None:
        from elastic_ft.core.trainer import run_training

        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.out = Path(cfg.with_absolute_paths().output_dir)

        def target() -> None:
            try:
                self.result = run_training(cfg, export=export)
            except BaseException as error:  # surfaced by join()
                self.error = error

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def join(self, timeout_s: float) -> dict[str, Any]:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"training still running after {timeout_s} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def metrics(self) -> list[dict[str, Any]]:
        from elastic_ft.events import read_steps

        return read_steps(self.out / "metrics.jsonl")

    def events(self) -> list[dict[str, Any]]:
        from elastic_ft.events import read_events

        path = self.out / "events.jsonl"
        return read_events(path) if path.exists() else []

    def wait_until(self, predicate: Callable[[BackgroundRun], bool], timeout_s: float,
                   what: str) -> float:
        """Poll until `predicate(self)`; returns the wall time it became true."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if predicate(self):
                return time.time()
            if not self.thread.is_alive():
                self.join(0)
                raise RuntimeError(f"run ended before: {what}")
            time.sleep(0.1)
        raise TimeoutError(f"not within {timeout_s} s: {what}")

    def registered_checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints Ray Train has registered (what a restart resumes from)."""
        from elastic_ft.core.checkpoint import RUN_NAME

        snapshot = self.out / "ray_storage" / RUN_NAME / "checkpoint_manager_snapshot.json"
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (OSError, ValueError, KeyError):
            return []
        return sorted(int(r["checkpoint_dir_name"].split("_")[1]) for r in results)

    def last_world_size(self) -> int | None:
        rows = self.metrics()
        return rows[-1]["world_size"] if rows else None
