"""The driver's look at the cluster before training: every node's inventory, and the device
types a worker can land on, each with its largest per-rank budget and a node to probe it on.

The budgets come from the nodes' monitors, never from the driver's own hardware (on a cluster
the driver usually sits on a CPU head node).
"""

from __future__ import annotations

import time
from typing import Any

from elastic_ft.config import RunConfig
from elastic_ft.resources.inventory import RankPlace, rank_budget_bytes, rank_device_type


def workers_that_fit(node_resources: dict[str, float], per_worker: dict[str, float]) -> int:
    needed = {k: v for k, v in per_worker.items() if v > 0}
    if not needed:
        return 0
    return int(min(node_resources.get(k, 0.0) // v for k, v in needed.items()))


def hosting_nodes(per_worker: dict[str, float]) -> dict[str, int]:
    """Alive nodes that can host at least one worker -> how many."""
    import ray

    return {n["NodeID"]: fit for n in ray.nodes() if n["Alive"]
            for fit in [workers_that_fit(n["Resources"], per_worker)] if fit > 0}


def wait_for_inventory(controller: Any, per_worker: dict[str, float],
                       timeout_s: float = 30.0) -> list[dict[str, Any]]:
    """The monitors' inventory once every node alive has reported: the ones that can host a
    worker are planned from it, and every one of them (a CPU head too) is paid for and priced
    in the cost report."""
    import ray

    deadline = time.time() + timeout_s
    while True:
        rows = ray.get(controller.inventory.remote())
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        missing = (alive | set(hosting_nodes(per_worker))) - {r["node_id"] for r in rows}
        if not missing or time.time() > deadline:
            return rows
        time.sleep(0.2)


def budgets_by_type(cfg: RunConfig, use_gpu: bool, hosting: dict[str, int],
                    samples: dict[str, dict[str, Any]]) -> dict[str, tuple[int, str]]:
    """Device type -> (the largest per-rank budget among its nodes, that node). `hosting`:
    the nodes that can host workers, and how many each (`hosting_nodes`)."""
    out: dict[str, tuple[int, str]] = {}
    for node_id, fit in sorted(hosting.items()):
        sample = samples.get(node_id)
        if sample is None:
            continue
        gpus = [str(g["index"]) for g in sample.get("gpus") or []][:1]
        place = RankPlace(node_id, tuple(gpus) if use_gpu else ())
        budget = rank_budget_bytes(place, sample, 1 if use_gpu else fit, use_gpu,
                                   cfg.train.mem_fraction, cfg.train.mem_cap_bytes)
        device_type = rank_device_type(place, sample, use_gpu)
        if device_type not in out or budget > out[device_type][0]:
            out[device_type] = (budget, node_id)
    return out
