"""Ray Train's side of a grow: the restart waits for a just-in-time checkpoint, and starts sooner.

Ray Train V2's elastic policy restarts a running worker group as soon as Ray Data's autoscaling
coordinator reserves room for more workers. Two things follow, measured on the fake-node
cluster:
- the coordinator refreshes its reservations every 20 s, so a join waited up to 20 s before
  Ray Train noticed it; `refresh_ray_reservations` makes it look again as soon as our
  controller sees the node;
- when that refresh happened to come first, Ray Train restarted the group before our controller
  had asked for a checkpoint, and the steps since the last one were lost.
  `CheckpointBeforeResize` closes that race: it runs inside Ray Train's controller, between
  its decision to resize a live group and the shutdown of that group, and waits there until
  our controller reports the workers' just-in-time checkpoint uploaded by every rank.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import ResizingState, RunningState

logger = logging.getLogger(__name__)

COORDINATOR_NAME = "AutoscalingCoordinator"  # ray.data ... default_autoscaling_coordinator
REQUESTER_ID = "elastic_ft"


class CheckpointBeforeResize(ControllerCallback):
    """Passed in `RunConfig(callbacks=...)`; Ray Train invokes it in its controller actor."""

    def __init__(self, controller: Any, timeout_s: float) -> None:
        self.controller = controller
        self.timeout_s = timeout_s

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        # RUNNING -> RESIZING is the one transition where a live group is about to be shut down
        # by a scaling decision (failures go through RESTARTING, with no group left to save)
        if not (isinstance(previous_state, RunningState)
                and isinstance(current_state, ResizingState)):
            return
        import ray

        to_workers = int(current_state.scaling_decision.num_workers)
        try:  # never raise here: Ray Train would count it as a controller failure
            ray.get(self.controller.checkpoint_before_restart.remote(to_workers, self.timeout_s),
                    timeout=self.timeout_s + 10)
        except Exception as error:
            logger.warning("elastic_ft: resizing without a just-in-time checkpoint: %r", error)


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
