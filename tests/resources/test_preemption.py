"""Cloud metadata preemption notices, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from elastic_ft.resources.preemption import check_notice, resolve_urls

AWS_PATH = "/latest/meta-data/spot/instance-action"
GCP_PATH = "/computeMetadata/v1/instance/preempted"


class FakeMetadata:
    """AWS IMDSv2 (token required) and GCP (Metadata-Flavor header required) endpoints."""

    def __init__(self) -> None:
        self.aws_action: dict | None = None
        self.gcp_preempted = False
        self.requests: list[str] = []
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: str = "") -> None:
                self.send_response(code)
                self.end_headers()
                self.wfile.write(body.encode())

            def do_PUT(self) -> None:
                state.requests.append(f"PUT {self.path}")
                ok = self.path == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds")
                self._send(200, "tok-123") if ok else self._send(400)

            def do_GET(self) -> None:
                state.requests.append(f"GET {self.path}")
                if self.path == AWS_PATH:
                    if self.headers.get("X-aws-ec2-metadata-token") != "tok-123":
                        return self._send(401)
                    if state.aws_action is None:
                        return self._send(404)
                    return self._send(200, json.dumps(state.aws_action))
                if self.path == GCP_PATH:
                    if self.headers.get("Metadata-Flavor") != "Google":
                        return self._send(403)
                    return self._send(200, "TRUE" if state.gcp_preempted else "FALSE")
                self._send(404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def metadata():
    server = FakeMetadata()
    yield server
    server.close()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def test_aws_notice_with_imdsv2_token(metadata) -> None:
    url = metadata.base + AWS_PATH
    assert check_notice(url) is None  # 404: nothing scheduled
    deadline = int(time.time()) + 120
    metadata.aws_action = {"action": "terminate", "time": _iso(deadline)}
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
    assert resolve_urls(["aws", "gcp"])[0].startswith("http://169.254.169.254/")


@pytest.mark.ray
def test_monitor_notice_becomes_jit_checkpoint_request(metadata, ray_local, tmp_path) -> None:
    """Monitor actor polls the endpoint -> controller -> the request the workers act on."""
    import ray

    from elastic_ft.events import read_events
    from elastic_ft.resources.controller import ElasticController

    controller = ray.remote(ElasticController).options(max_concurrency=8).remote(
        str(tmp_path), 8, 2, 1, 2, {"CPU": 1}, 0.2, None, True, True, 45.0,
        [metadata.base + AWS_PATH], 0.2)
    node = ray.get_runtime_context().get_node_id()
    ray.get(controller.plan.remote(2, [node, node]))  # both workers on this node
    ray.get(controller.record.remote("checkpoint", {"step": 1, "seconds": 200.0}))
    time.sleep(1.0)
    assert ray.get(controller.poll.remote()) is None  # no notice yet
    metadata.aws_action = {"action": "terminate", "time": _iso(time.time() + 120)}
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
