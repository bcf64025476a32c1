"""Spot/preemptible notices from cloud metadata endpoints, polled by each node's monitor.

AWS: `GET /latest/meta-data/spot/instance-action` answers 404 until a reclaim is scheduled,
then `{"action": "terminate"|"stop", "time": "2026-11-22T18:00:00Z"}` (about 2 minutes ahead);
IMDSv2 wants a session token from `PUT /latest/api/token` first. GCP: `GET
/computeMetadata/v1/instance/preempted` with `Metadata-Flavor: Google` answers `FALSE`, then
`TRUE` about 30 s before the VM stops. URLs are configurable so tests (and proxies) can point
them anywhere; `aws` and `gcp` name the real ones, as each node's environment resolves them.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

AWS_SPOT_PATH = "/latest/meta-data/spot/instance-action"
GCP_PREEMPTED_PATH = "/computeMetadata/v1/instance/preempted"
PRESET_URLS = {
    "aws": "http://169.254.169.254" + AWS_SPOT_PATH,
    "gcp": "http://metadata.google.internal" + GCP_PREEMPTED_PATH,
}
GCP_NOTICE_S = 30.0  # GCE stops a preempted VM about 30 s after the flag turns TRUE


@dataclass(frozen=True)
class PreemptionNotice:
    source: str  # the URL that answered
    kind: str  # "aws" or "gcp"
    deadline_s: float | None  # unix time the node goes, when the cloud says
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_urls(urls: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """`aws`/`gcp` -> this node's endpoint; other entries are URLs as given.

    Resolved on the node itself, honouring the overrides the clouds' own SDKs read there:
    `AWS_EC2_METADATA_SERVICE_ENDPOINT` (boto3; e.g. IPv6-only instances) and
    `GCE_METADATA_HOST` (google-auth; host[:port])."""
    env = os.environ if environ is None else environ
    presets = dict(PRESET_URLS)
    if env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT"):
        presets["aws"] = env["AWS_EC2_METADATA_SERVICE_ENDPOINT"].rstrip("/") + AWS_SPOT_PATH
    if env.get("GCE_METADATA_HOST"):
        presets["gcp"] = f"http://{env['GCE_METADATA_HOST']}" + GCP_PREEMPTED_PATH
    return [presets.get(u, u) for u in urls]


def _style(url: str) -> str:
    path = urlsplit(url).path
    if path.endswith("/spot/instance-action"):
        return "aws"
    if path.endswith("/instance/preempted"):
        return "gcp"
    raise ValueError(f"{url}: not an AWS spot/instance-action or GCP instance/preempted URL")


def _aws_token(url: str, timeout_s: float) -> str | None:
    parts = urlsplit(url)
    request = urllib.request.Request(
        f"{parts.scheme}://{parts.netloc}/latest/api/token", method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read().decode().strip()
    except (urllib.error.URLError, OSError):
        return None  # IMDSv1 endpoint (or none): ask without a token


def check_notice(url: str, timeout_s: float = 1.0) -> PreemptionNotice | None:
    """One poll of one endpoint: the notice, or None (no notice, or endpoint unreachable)."""
    style = _style(url)
    headers = {"Metadata-Flavor": "Google"} if style == "gcp" else {}
    if style == "aws":
        token = _aws_token(url, timeout_s)
        if token:
            headers["X-aws-ec2-metadata-token"] = token
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                    timeout=timeout_s) as response:
            body = response.read().decode().strip()
    except (urllib.error.URLError, OSError):  # 404 = no notice scheduled; or not on this cloud
        return None
    if style == "gcp":
        if body.upper() != "TRUE":
            return None
        return PreemptionNotice(url, "gcp", time.time() + GCP_NOTICE_S, "instance/preempted=TRUE")
    try:
        action = json.loads(body)
        deadline = datetime.fromisoformat(action["time"].replace("Z", "+00:00")).timestamp()
    except (ValueError, KeyError, TypeError):
        return PreemptionNotice(url, "aws", None, f"unparsed instance-action: {body[:200]}")
    return PreemptionNotice(url, "aws", deadline, f"{action.get('action', '?')} at {action['time']}")


def first_notice(urls: list[str], timeout_s: float = 1.0) -> PreemptionNotice | None:
    for url in urls:
        notice = check_notice(url, timeout_s)
        if notice is not None:
            return notice
    return None


def request_ray_drain(node_id: str, deadline_ms: int, message: str,
                      reason: str = "preemption",
                      gcs_address: str | None = None) -> tuple[bool, str]:
    """Ask Ray's GCS to drain a node, as Ray's autoscaler does before it removes one: a
    preemption drain (or an idle termination) with a deadline in unix ms (0: none). Returns
    whether the GCS accepted, and its message."""
    import ray
    from ray.core.generated import autoscaler_pb2

    reason_code = {"preemption": "DRAIN_NODE_REASON_PREEMPTION",
                   "idle": "DRAIN_NODE_REASON_IDLE_TERMINATION"}[reason]
    gcs = ray._raylet.GcsClient(address=gcs_address or ray.get_runtime_context().gcs_address)
    accepted, reply = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value(reason_code),
                                     message[:200], max(0, int(deadline_ms)))
    return bool(accepted), str(reply)


def drain_noticed_node(node_id: str, deadline_ms: int, message: str) -> bool:
    """Tell Ray the noticed node is going: a preemption drain with the notice's deadline
    (0: none known).

    Ray then places nothing new there, so the group that restarts after the just-in-time
    checkpoint leaves the node out (Ray Train and the drain-aware coordinator both see it
    draining), instead of starting again on it and losing the steps when it goes. A cloud
    notice or a SIGTERM reaches only our monitor or worker; Ray would not know otherwise.
    Never the head node: the cluster ends with it, and on a one-node cluster a drained head
    could host no new group at all. False then, or when the GCS refused or could not be
    reached (the run waits for the node to go, as before).
    """
    import ray

    try:
        node = next((n for n in ray.nodes() if n["NodeID"] == node_id), None)
        if node is None or "node:__internal_head__" in node.get("Resources", {}):
            return False
        return request_ray_drain(node_id, deadline_ms, message)[0]
    except Exception:  # internal to Ray 2.60: a missing drain costs a slower restart only
        return False
