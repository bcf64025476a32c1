"""Ray Train's side of a resize: the restart waits for a just-in-time checkpoint, and starts at a
size the cluster can place.

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

The first group and every restart are sized from the same reservations, and three more gaps
showed on the fake-node cluster:
- the coordinator is detached and outlives a run: a run started on a cluster whose nodes changed
  since its last tick got a group sized from the old view (a CI run started 1 worker beside 2
  free nodes; most likely the tick fell between the two nodes' joins, 1 s apart), and would
  grow only after the next tick and a restart. `RefreshBeforeSizing` has it look again when
  Ray Train's controller starts, after Ray Train's request and before its first decision;
- after a hard loss the coordinator still counted the dead node until its next tick, and Ray
  Train often restarts before the GCS has even declared the node dead (a placement attempt
  that waits out `workers.start_timeout_s`, `benchmarks/elastic_recovery.py` timelines):
  `RefreshBeforeSizing` waits for the GCS to declare a node of the old group dead whose raylet
  no longer answers, then has the coordinator recompute, before Ray Train's decision;
- a draining node is alive, so the coordinator counts it, while Ray places nothing new there:
  `start_drain_aware_coordinator` starts Ray's coordinator first, seeing draining nodes as gone.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable
from typing import Any

from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
    _AutoscalingCoordinatorActor,
)
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback
from ray.train.v2._internal.execution.controller.state import (
    ReschedulingState,
    ResizingState,
    RestartingState,
    RunningState,
)
from ray.train.v2._internal.execution.scaling_policy.elastic import ElasticScalingPolicy

from elastic_ft.resources.node_health import death_detection_s
from elastic_ft.resources.reservations import (
    COORDINATOR_NAME,
    refresh_ray_reservations,
    schedulable_nodes,
)

logger = logging.getLogger(__name__)

# how long the GCS takes to declare a killed node dead with the training health checks, and
# 2 s to spare
DEATH_WAIT_S = death_detection_s() + 2.0


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


class RefreshBeforeSizing(ControllerCallback, WorkerGroupCallback):
    """Ray Train is about to size a group, the first or one after a failure: have the
    coordinator look at the cluster first.

    At the start, Ray Train's scaling policy (the first controller callback) has just sent its
    request, which the coordinator placed on its last tick's view of the nodes; this hook runs
    after it and before the controller's first decision, which reads the reservations afresh.

    When a node is killed, the surviving ranks fail at once (their collective's peer is gone),
    while the GCS declares the node dead only after its health checks (about 3 s,
    `node_health.py`); a refresh in between still counts the node. So a node of the old group
    whose raylet refuses a connection (or does not answer within `probe_timeout_s`) is waited
    for, up to `death_wait_s`, until the GCS has declared it dead. Ray Train's elastic policy
    also reuses reservations it read within the last `GET_RESERVED_RESOURCES_INTERVAL_S`
    (1 s): coming from a running group, which may have just read them, the hook waits that out.
    """

    def __init__(self, death_wait_s: float = DEATH_WAIT_S, probe_timeout_s: float = 1.0) -> None:
        self.death_wait_s, self.probe_timeout_s = death_wait_s, probe_timeout_s
        self.group_nodes: set[str] = set()

    def after_controller_start(self, train_run_context: Any) -> None:
        refresh_ray_reservations()  # never raises: a missing coordinator costs speed only

    def after_worker_group_start(self, worker_group: Any) -> None:
        self.group_nodes = {w.metadata.node_id for w in worker_group.get_workers()}

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        if not isinstance(current_state, (RestartingState, ReschedulingState)):
            return
        import ray

        t0 = time.monotonic()
        try:  # never raise here: Ray Train would count it as a controller failure
            going = unreachable_nodes(self.group_nodes, ray.nodes(), self.probe_timeout_s)
            while going and time.monotonic() - t0 < self.death_wait_s:
                time.sleep(0.2)
                alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
                going &= alive
        except Exception as error:
            logger.info("elastic_ft: could not check the old group's nodes: %r", error)
        refreshed_t = time.monotonic()
        refresh_ray_reservations()
        if isinstance(previous_state, RunningState):
            reuse_s = ElasticScalingPolicy.GET_RESERVED_RESOURCES_INTERVAL_S
            time.sleep(max(0.0, reuse_s - (time.monotonic() - refreshed_t)))


def unreachable_nodes(node_ids: Iterable[str], nodes: list[dict[str, Any]],
                      timeout_s: float) -> set[str]:
    """The nodes among `node_ids` the GCS still lists as alive whose raylet does not accept a
    connection: killed (refused at once) or cut off (no answer within `timeout_s`)."""
    wanted = set(node_ids)
    going = set()
    for node in nodes:
        if node["NodeID"] in wanted and node["Alive"]:
            try:
                with socket.create_connection(
                        (node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout_s):
                    pass
            except OSError:
                going.add(node["NodeID"])
    return going


class DrainAwareCoordinator(_AutoscalingCoordinatorActor):
    """Ray Data's autoscaling coordinator, reading the cluster through `schedulable_nodes`."""

    def __init__(self) -> None:
        super().__init__(get_cluster_nodes=schedulable_nodes)

    def drain_aware(self) -> bool:
        return True


def start_drain_aware_coordinator() -> bool:
    """Start Ray's coordinator as `DrainAwareCoordinator`, with the options Ray Data and Ray
    Train use to get or create it, so both find this one. False when a plain one already runs
    (started by an earlier job on this cluster; it is detached): a drain's restart then waits
    out one placement attempt, as before."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    coordinator = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(
        DrainAwareCoordinator).options(
        name=COORDINATOR_NAME, namespace=COORDINATOR_NAME, get_if_exists=True,
        lifetime="detached", scheduling_strategy=NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)).remote()
    try:
        return bool(ray.get(coordinator.drain_aware.remote(), timeout=30))
    except Exception as error:  # the plain coordinator has no such method
        logger.info("elastic_ft: Ray's coordinator is not drain-aware: %r", error)
        return False
