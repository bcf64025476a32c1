"""Spot/preemptible notices from cloud metadata endpoints, polled by each node's monitor.

AWS: `GET /latest/meta-data/spot/instance-action` answers 404 until a reclaim is scheduled,
then `{"action": "terminate"|"stop", "time": "2026-11-22T18:00:00Z"}` (about 2 minutes ahead);
IMDSv2 wants a session token from `PUT /latest/api/token` first. GCP: `GET
/computeMetadata/v1/instance/preempted` with `Metadata-Flavor: Google` answers `FALSE`, then
`TRUE` about 30 s before the VM stops. URLs are configurable so tests (and proxies) can point
them anywhere; `aws` and `gcp` name the real ones.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

PRESET_URLS = {
    "aws": "http://169.254.169.254/latest/meta-data/spot/instance-action",
    "gcp": "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
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


def resolve_urls(urls: list[str]) -> list[str]:
    return [PRESET_URLS.get(u, u) for u in urls]


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
