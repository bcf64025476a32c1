"""The restart gate: Ray Train's resize of a live group waits for our just-in-time checkpoint.

Real Ray: the controller actor, Ray Train's own controller-state and decision objects, and Ray
Data's autoscaling coordinator. The full join on a multi-node cluster is in
tests/integration/test_elastic.py.
"""

from __future__ import annotations

import socket
import time

import pytest
from ray.train.v2._internal.execution.controller.state import (
    ReschedulingState,
    ResizingState,
    RestartingState,
    RunningState,
    SchedulingState,
)
from ray.train.v2._internal.execution.scaling_policy import ResizeDecision

from elastic_ft.events import read_events
from elastic_ft.resources.reservations import (
    find_coordinator,
    refresh_ray_reservations,
    without_draining,
)
from elastic_ft.resources.restart_gate import (
    CheckpointBeforeResize,
    RefreshBeforeSizing,
    start_drain_aware_coordinator,
    unreachable_nodes,
)
from tests.conftest import fleet_for_tests, places

pytestmark = pytest.mark.ray


@pytest.fixture
def controller(ray_local, tmp_path):
    from elastic_ft.resources.controller import ElasticController

    actor = ray_local.remote(ElasticController).options(max_concurrency=8).remote(
        str(tmp_path), fleet_for_tests(), 1, 2, {"CPU": 1}, 0.5, start_monitors=False)
    ray_local.get(actor.plan.remote(places("a", "b")))
    yield actor
    ray_local.kill(actor)


def _events(tmp_path, name: str) -> list[dict]:
    return [e for e in read_events(tmp_path / "events.jsonl") if e["event"] == name]


def test_restart_waits_until_every_rank_uploaded_the_checkpoint(ray_local, controller, tmp_path):
    ray = ray_local
    # a group still loading has trained nothing: nothing to lose, no wait
    assert ray.get(controller.checkpoint_before_restart.remote(1, 30))["checkpoint"] is False
    ray.get(controller.metrics.remote({"step": 3, "loss": 1.0}))
    gate = controller.checkpoint_before_restart.remote(1, 30)
    request = None
    while request is None:
        request = ray.get(controller.poll.remote())
    assert request["kind"] == "resize" and request["restart"] and "2 -> 1" in request["reason"]
    ray.get(controller.uploaded.remote(3, 0, 2, "resize", time.time()))
    ready, _ = ray.wait([gate], timeout=1.0)
    assert not ready, "released with one rank's part of the checkpoint still missing"
    ray.get(controller.uploaded.remote(3, 1, 2, "resize", time.time()))
    outcome = ray.get(gate, timeout=10)
    assert outcome["checkpoint"] is True
    assert ray.get(controller.poll.remote()) is None
    jit = _events(tmp_path, "jit_checkpoint")
    assert [(j["step"], j["reason"]) for j in jit] == [(3, "resize")]
    # step 3 is now in storage: a second resize has nothing to wait for
    assert ray.get(controller.checkpoint_before_restart.remote(1, 30))["checkpoint"] is False


def test_periodic_upload_counts_but_a_stuck_group_times_out(ray_local, controller, tmp_path):
    ray = ray_local
    ray.get(controller.metrics.remote({"step": 10, "loss": 1.0}))
    for rank in (0, 1):  # the periodic checkpoint of step 10: complete, not a JIT
        ray.get(controller.uploaded.remote(10, rank, 2, None, time.time()))
    assert ray.get(controller.checkpoint_before_restart.remote(1, 30))["checkpoint"] is False
    ray.get(controller.metrics.remote({"step": 11, "loss": 1.0}))
    t0 = time.time()
    outcome = ray.get(controller.checkpoint_before_restart.remote(1, 1.0), timeout=20)
    assert outcome["checkpoint"] is False and 1.0 <= time.time() - t0 < 10
    assert _events(tmp_path, "jit_checkpoint_timeout")
    assert not _events(tmp_path, "jit_checkpoint")


def test_gate_acts_only_when_a_live_group_is_resized(ray_local, controller, tmp_path):
    ray = ray_local
    ray.get(controller.metrics.remote({"step": 5, "loss": 1.0}))
    gate = CheckpointBeforeResize(controller, timeout_s=0.5)
    decision = ResizeDecision(num_workers=1, resources_per_worker={"CPU": 1})
    # a restart after a failure: the group is gone, nothing is asked of it
    gate.after_controller_state_update(RestartingState(None), SchedulingState(decision))
    gate.after_controller_state_update(RunningState(), RunningState())
    assert not _events(tmp_path, "jit_checkpoint_requested")
    # Ray Train decided to resize the running group: it waits (here until the timeout; the
    # hook never raises into Ray Train's controller)
    t0 = time.time()
    gate.after_controller_state_update(RunningState(), ResizingState(decision))
    assert time.time() - t0 >= 0.5
    assert [e["kind"] for e in _events(tmp_path, "jit_checkpoint_requested")] == ["resize"]
    assert _events(tmp_path, "jit_checkpoint_timeout")


def test_refresh_has_rays_coordinator_recompute_reservations(ray_local):
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    coordinator = get_or_create_autoscaling_coordinator()
    assert find_coordinator() is True  # the handle, looked up once (reservations.py)
    assert refresh_ray_reservations() is True
    ray_local.kill(coordinator)
    # a coordinator started since: the stale handle is dropped and the new one found
    replacement = get_or_create_autoscaling_coordinator()
    assert refresh_ray_reservations() is True
    ray_local.kill(replacement)
    assert refresh_ray_reservations() is False  # no coordinator: no error, just slower


def test_a_draining_node_counts_as_gone_and_nothing_else_changes() -> None:
    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 4.0}},
             {"NodeID": "b", "Alive": True, "Resources": {"CPU": 4.0}},
             {"NodeID": "c", "Alive": False, "Resources": {"CPU": 4.0}}]
    seen = without_draining(nodes, {"b": 1_700_000_000_000, "z": 0})
    assert [n["Alive"] for n in seen] == [True, False, False]
    assert seen[1]["Resources"] == {"CPU": 4.0} and nodes[1]["Alive"] is True  # a copy
    assert without_draining(nodes, []) == nodes


def test_drain_aware_coordinator_starts_unless_a_plain_one_runs(ray_local):
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    plain = get_or_create_autoscaling_coordinator()  # as an earlier job would have left it
    assert start_drain_aware_coordinator() is False
    ray_local.kill(plain)
    assert start_drain_aware_coordinator() is True
    assert start_drain_aware_coordinator() is True  # a later run finds it, as Ray Train does
    ours = get_or_create_autoscaling_coordinator()
    assert ray_local.get(ours.drain_aware.remote()) is True
    # it answers Ray Train's and Ray Data's calls as the plain one does
    ray_local.get(ours.request_resources.remote(
        requester_id="t", resources=[{"CPU": 1}], expire_after_s=60))
    assert refresh_ray_reservations() is True
    reserved = ray_local.get(ours.get_reserved_resources.remote("t", recompute=True))
    assert sum(bundle.get("CPU", 0) for bundle in reserved.values()) >= 1
    ray_local.kill(ours)


def test_restart_hook_refreshes_and_outwaits_rays_cached_reservations(ray_local) -> None:
    hook = RefreshBeforeSizing()
    t0 = time.monotonic()
    hook.after_controller_state_update(RunningState(), RunningState())
    hook.after_controller_state_update(
        SchedulingState(ResizeDecision(num_workers=1, resources_per_worker={})), RunningState())
    assert time.monotonic() - t0 < 0.5  # not a restart: nothing to do
    t0 = time.monotonic()  # from a running group: Ray Train may have read them just now
    hook.group_nodes = {ray_local.get_runtime_context().get_node_id()}  # alive, answering
    hook.after_controller_state_update(RunningState(), RestartingState(None))
    assert 1.0 <= time.monotonic() - t0 < hook.death_wait_s
    t0 = time.monotonic()  # a failed placement: Ray Train read nothing since
    hook.after_controller_state_update(
        SchedulingState(ResizeDecision(num_workers=1, resources_per_worker={})),
        ReschedulingState(None))
    assert time.monotonic() - t0 < 1.0


def test_a_node_of_the_group_whose_raylet_refuses_is_waited_for() -> None:
    with socket.socket() as listening, socket.socket() as gone:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        gone.bind(("127.0.0.1", 0))  # a port nothing listens on: a killed raylet's
        up_port, gone_port = listening.getsockname()[1], gone.getsockname()[1]

        def node(node_id: str, alive: bool, port: int) -> dict:
            return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "127.0.0.1",
                    "NodeManagerPort": port}

        nodes = [node("up", True, up_port), node("killed", True, gone_port),
                 node("declared", False, gone_port), node("elsewhere", True, gone_port)]
        # only the old group's nodes the GCS still lists as alive are probed
        assert unreachable_nodes({"up", "killed", "declared", "unknown"}, nodes, 0.5) == {
            "killed"}
        assert unreachable_nodes(set(), nodes, 0.5) == set()


def test_the_first_group_is_sized_from_the_cluster_as_it_is_now(ray_local) -> None:
    """Ray Train's scaling policy sends its request at controller start, and the coordinator
    places it on its last tick's view of the nodes; a node that joined since would be missed
    until the next tick (20 s) and a restart. The hook has the coordinator look again."""
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        _AutoscalingCoordinatorActor,
    )

    from elastic_ft.resources.reservations import COORDINATOR_NAME

    class ListedNodesCoordinator(_AutoscalingCoordinatorActor):
        """Ray's coordinator, seeing this node and the nodes the test lists as joined."""

        TICK_INTERVAL_S = 3600  # only a recompute looks at the cluster during the test

        def __init__(self) -> None:
            self.joined: list[dict] = []
            super().__init__(get_cluster_nodes=lambda: ray_local.nodes() + self.joined)

        def join(self, node_id: str) -> None:
            self.joined.append({"NodeID": node_id, "Alive": True, "Labels": {},
                                "Resources": {"CPU": 1.0, "trainer": 1.0}})

    try:  # an earlier test's coordinator would answer instead
        ray_local.kill(ray_local.get_actor(COORDINATOR_NAME, namespace=COORDINATOR_NAME))
    except ValueError:
        pass
    coordinator = ray_local.remote(ListedNodesCoordinator).options(
        name=COORDINATOR_NAME, namespace=COORDINATOR_NAME).remote()
    try:
        ray_local.get(coordinator.request_resources.remote(
            requester_id="train-run", resources=[{"trainer": 1}] * 2, expire_after_s=60))
        reserved = coordinator.get_reserved_resources.remote
        assert ray_local.get(reserved("train-run")) == {}  # this node has no "trainer"
        ray_local.get(coordinator.join.remote("joined"))
        assert ray_local.get(reserved("train-run")) == {}  # the view of the last look
        RefreshBeforeSizing().after_controller_start(None)
        assert ray_local.get(reserved("train-run")) == {"joined": {"trainer": 1}}
    finally:
        ray_local.kill(coordinator)
