"""Ray Data's autoscaling coordinator, as our controller talks to it: ask it to recompute its
reservations now, and the view of the cluster it should size groups from.

Plain Ray core only: this is imported by the controller actor at every run start, and the
Ray Train / Ray Data classes `restart_gate.py` needs cost about 1.5 s of imports there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

COORDINATOR_NAME = "AutoscalingCoordinator"  # ray.data ... default_autoscaling_coordinator
REQUESTER_ID = "elastic_ft"


def refresh_ray_reservations() -> bool:
    """Have Ray Data's autoscaling coordinator recompute its reservations now.

    Ray Train's elastic policy sizes the group from those reservations; without this a node
    that joined is seen only at the coordinator's next 20 s tick. False when there is no
    coordinator (no elastic run yet) or it could not be reached.
    """
    import ray

    for attempt in range(2):  # a cached handle of a coordinator that was since replaced
        try:
            coordinator = _coordinator(fresh=attempt > 0)
            ray.get(coordinator.get_reserved_resources.remote(REQUESTER_ID, recompute=True),
                    timeout=10)
            return True
        except Exception as error:  # internal to Ray 2.60: a missing hook costs speed only
            _COORDINATOR.clear()
            last_error = error
    logger.info("elastic_ft: could not refresh Ray's resource reservations: %r", last_error)
    return False


_COORDINATOR: dict[str, Any] = {}


def find_coordinator() -> bool:
    """Look the coordinator's handle up now, while the cluster is quiet (the controller's
    start), so that the first refresh, at a join, does not; False if there is none yet."""
    try:
        _coordinator(fresh=True)
        return True
    except Exception:  # ValueError: no such actor (the refresh looks again)
        return False


def _coordinator(fresh: bool) -> Any:
    """The coordinator's handle, looked up once: while a node joins, the name lookup in the
    GCS took 4-7 s on the fake-node cluster (the call itself 0.02 s), and the grow waited."""
    import ray

    if fresh or "handle" not in _COORDINATOR:
        _COORDINATOR["handle"] = ray.get_actor(COORDINATOR_NAME, namespace=COORDINATOR_NAME)
    return _COORDINATOR["handle"]


def without_draining(nodes: list[dict[str, Any]], draining: Iterable[str]) -> list[dict[str, Any]]:
    """`ray.nodes()` as the coordinator should see it for a new group: a draining node is one
    Ray will place nothing new on, so it counts as not alive."""
    gone = set(draining)
    return [{**node, "Alive": False} if node.get("NodeID") in gone else node for node in nodes]


def schedulable_nodes() -> list[dict[str, Any]]:
    import ray

    draining = ray._private.state.state.get_draining_nodes()
    return without_draining(ray.nodes(), draining)
