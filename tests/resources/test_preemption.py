"""Cloud metadata preemption notices, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import time

import pytest

from elastic_ft.resources.preemption import check_notice, resolve_urls
from tests.conftest import fleet_for_tests, places
from tests.metadata_server import AWS_PATH, GCP_PATH, FakeMetadata, iso


@pytest.fixture
def metadata():
    server = FakeMetadata()
    yield server
    server.close()


def test_aws_notice_with_imdsv2_token(metadata) -> None:
    url = metadata.base + AWS_PATH
    assert check_notice(url) is None  # 404: nothing scheduled
    deadline = int(time.time()) + 120
    metadata.aws_action = {"action": "terminate", "time": iso(deadline)}
    notice = check_notice(url)
    assert notice is not None and notice.kind == "aws" and notice.deadline_s == deadline
    assert "terminate" in notice.detail
    assert "PUT /latest/api/token" in metadata.requests  # IMDSv2 session token first


def test_gcp_notice_needs_flavor_header(metadata) -> None:
    url = metadata.base + GCP_PATH
    assert check_notice(url) is None  # FALSE
    metadata.gcp_preempted = True
    notice = check_notice(url)
    assert notice is not None and notice.kind == "gcp"
    assert 25 < notice.deadline_s - time.time() <= 30


def test_unreachable_or_unknown_endpoints() -> None:
    # off-cloud (nothing listening) is "no notice", not an error
    assert check_notice("http://127.0.0.1:9" + AWS_PATH, timeout_s=0.5) is None
    with pytest.raises(ValueError, match="not an AWS"):
        check_notice("http://127.0.0.1:9/latest/meta-data/other")
    assert resolve_urls(["aws", "gcp"], {}) == [
        "http://169.254.169.254" + AWS_PATH, "http://metadata.google.internal" + GCP_PATH]
    # the overrides the clouds' SDKs honour, read on the node that polls
    node_env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://[fd00:ec2::254]/",
                "GCE_METADATA_HOST": "127.0.0.1:8080"}
    assert resolve_urls(["aws", "gcp", "http://x" + AWS_PATH], node_env) == [
        "http://[fd00:ec2::254]" + AWS_PATH, "http://127.0.0.1:8080" + GCP_PATH,
        "http://x" + AWS_PATH]


@pytest.mark.ray
def test_monitor_notice_becomes_jit_checkpoint_request(metadata, ray_local, tmp_path) -> None:
    """Monitor actor polls the endpoint -> controller -> the request the workers act on."""
    import ray

    from elastic_ft.events import read_events
    from elastic_ft.resources.controller import ElasticController

    controller = ray.remote(ElasticController).options(max_concurrency=8).remote(
        str(tmp_path), fleet_for_tests(cap=2), 1, 2, {"CPU": 1}, 0.2, preemption_urls=[
            metadata.base + AWS_PATH], preemption_poll_s=0.2)
    node = ray.get_runtime_context().get_node_id()
    ray.get(controller.plan.remote(places(node, node)))  # both workers on this node
    ray.get(controller.record.remote("checkpoint", {"step": 1, "seconds": 200.0}))
    time.sleep(1.0)
    assert ray.get(controller.poll.remote()) is None  # no notice yet
    metadata.aws_action = {"action": "terminate", "time": iso(time.time() + 120)}
    request = None
    deadline = time.time() + 15
    while request is None and time.time() < deadline:
        request = ray.get(controller.poll.remote())
        time.sleep(0.2)
    assert request is not None and request["kind"] == "preemption" and request["restart"]
    events = read_events(tmp_path / "events.jsonl")
    notice = [e for e in events if e["event"] == "preemption_notice"]
    assert notice and notice[0]["node_id"] == node and notice[0]["cloud"] == "aws"
    # the last checkpoint took 200 s but the node goes in 120 s: say so, checkpoint anyway
    warnings = [e for e in events if e["event"] == "warning"]
    assert warnings and "shorter than the last checkpoint" in warnings[0]["message"]
    ray.get(controller.shutdown.remote())
    ray.kill(controller)
