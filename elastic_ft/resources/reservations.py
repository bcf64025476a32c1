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

    try:
        coordinator = ray.get_actor(COORDINATOR_NAME, namespace=COORDINATOR_NAME)
        ray.get(coordinator.get_reserved_resources.remote(REQUESTER_ID, recompute=True),
                timeout=10)
        return True
    except Exception as error:  # internal to Ray 2.60: a missing hook costs speed, not work
        logger.info("elastic_ft: could not refresh Ray's resource reservations: %r", error)
        return False


def without_draining(nodes: list[dict[str, Any]], draining: Iterable[str]) -> list[dict[str, Any]]:
    """`ray.nodes()` as the coordinator should see it for a new group: a draining node is one
    Ray will place nothing new on, so it counts as not alive."""
    gone = set(draining)
    return [{**node, "Alive": False} if node.get("NodeID") in gone else node for node in nodes]


def schedulable_nodes() -> list[dict[str, Any]]:
    import ray

    draining = ray._private.state.state.get_draining_nodes()
    return without_draining(ray.nodes(), draining)
