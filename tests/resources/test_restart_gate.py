"""The restart gate: Ray Train's resize of a live group waits for our just-in-time checkpoint.

Real Ray: the controller actor, Ray Train's own controller-state and decision objects, and Ray
Data's autoscaling coordinator. The full join on a multi-node cluster is in
tests/integration/test_elastic.py.
"""

from __future__ import annotations

import time

import pytest
from ray.train.v2._internal.execution.controller.state import (
    ResizingState,
    RestartingState,
    RunningState,
    SchedulingState,
)
from ray.train.v2._internal.execution.scaling_policy import ResizeDecision

from elastic_ft.events import read_events
from elastic_ft.resources.restart_gate import CheckpointBeforeResize, refresh_ray_reservations
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
    assert refresh_ray_reservations() is True
    ray_local.kill(coordinator)
    assert refresh_ray_reservations() is False  # no coordinator: no error, just slower
