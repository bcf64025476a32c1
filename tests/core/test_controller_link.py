"""Rank 0's link to the controller: a poll that answers when a request is made, and step
records sent together. Real Ray, a real controller actor, its metrics.jsonl read back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from elastic_ft.core.controller_link import MetricsOutbox, RequestPoll
from tests.conftest import fleet_for_tests

pytestmark = pytest.mark.ray


@pytest.fixture
def controller(ray_local, tmp_path):
    import ray

    from elastic_ft.resources.controller import ElasticController

    actor = ray.remote(ElasticController).options(max_concurrency=8).remote(
        str(tmp_path), fleet_for_tests(cap=2), 1, 2, {"CPU": 1}, start_monitors=False)
    yield actor
    ray.kill(actor)


def _take_within(poll: RequestPoll, timeout_s: float) -> dict | None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        request = poll.take()
        if request is not None:
            return request
        time.sleep(0.02)
    return None


def test_a_poll_answers_when_the_request_is_made_and_once(controller) -> None:
    import ray

    poll = RequestPoll(controller, wait_s=60)
    time.sleep(0.5)
    assert poll.take() is None  # waiting in the controller: no request yet, no call per step
    t0 = time.time()
    ray.get(controller.request_checkpoint.remote("drain", True, "node n1 drains"))
    request = _take_within(poll, 5)
    assert request == {"kind": "drain", "restart": True, "reason": "node n1 drains"}
    assert time.time() - t0 < 2  # answered when made, not when the 60 s wait ran out
    # not asked again until the request is handled: it is still pending in the controller
    time.sleep(0.3)
    assert poll.take() is None
    # its checkpoint is in storage (one rank of one): the request is done
    ray.get(controller.uploaded.remote(7, 0, 1, "drain", time.time()))
    poll.rearm()
    assert _take_within(poll, 0.5) is None
    ray.get(controller.request_checkpoint.remote("preemption", True, "cloud notice"))
    assert _take_within(poll, 5) == {"kind": "preemption", "restart": True,
                                     "reason": "cloud notice"}


def test_a_poll_without_a_request_answers_none_after_its_wait(controller) -> None:
    import ray

    t0 = time.time()
    assert ray.get(controller.poll.remote(0.3)) is None
    assert 0.3 <= time.time() - t0 < 3


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


def _steps_when(out: Path, n: int, timeout_s: float = 10) -> list[int]:
    deadline = time.time() + timeout_s
    while len(_steps(out)) < n and time.time() < deadline:
        time.sleep(0.02)
    return _steps(out)


def test_step_records_go_together_and_at_once_when_they_must(controller, tmp_path) -> None:
    outbox = MetricsOutbox(controller, interval_s=60)
    t0 = time.time()
    outbox.add({"step": 1, "loss": 1.0}, t0)  # a group's first step: at once
    assert _steps_when(tmp_path, 1) == [1]
    outbox.add({"step": 2, "loss": 1.0}, t0 + 1)
    outbox.add({"step": 3, "loss": 1.0}, t0 + 2)
    time.sleep(0.5)
    assert _steps(tmp_path) == [1]  # held: within the interval
    outbox.add({"step": 4, "loss": 1.0}, t0 + 3, send_now=True)  # e.g. a checkpoint's step
    assert _steps_when(tmp_path, 4) == [1, 2, 3, 4]  # in one call, in step order
    outbox.add({"step": 5, "loss": 1.0}, t0 + 4)
    outbox.add({"step": 6, "loss": 1.0}, t0 + 63)  # the interval is over
    assert _steps_when(tmp_path, 6) == [1, 2, 3, 4, 5, 6]
    outbox.add({"step": 7, "loss": 1.0}, t0 + 64)
    outbox.flush()  # the group ends or fails: what is held goes
    assert _steps_when(tmp_path, 7) == [1, 2, 3, 4, 5, 6, 7]
