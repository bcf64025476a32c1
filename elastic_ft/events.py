"""`events.jsonl`: one JSON object per line, `{"event": ..., "t": unix_s, ...fields}`.

Appends are line-atomic (one write per event, O_APPEND), so the driver, the controller actor and
rank 0 can all log to the same file on a shared path without interleaving partial lines.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

SECRET_MARKERS = ("token", "secret", "password", "api_key", "access_key")


def redact(value: Any) -> Any:
    """Drop anything that looks like a credential before it reaches a log or a saved config."""
    if isinstance(value, dict):
        return {
            k: ("<redacted>" if any(m in str(k).lower() for m in SECRET_MARKERS) else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _URI_CREDENTIALS.sub(r"\1<redacted>@", value)
    return value


_SECRET_ASSIGNMENT = re.compile(
    r"((?:" + "|".join(SECRET_MARKERS) + r")[A-Za-z_]*\s*[:=]\s*)[\"']?[^\s\"',}]+",
    re.IGNORECASE)


# `s3://KEY:SECRET@bucket/path`: pyarrow takes credentials in a storage URI
_URI_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact_text(text: str) -> str:
    """`HF_TOKEN=hf_abc` -> `HF_TOKEN=<redacted>` in free text such as streamed job logs."""
    return _URI_CREDENTIALS.sub(r"\1<redacted>@", _SECRET_ASSIGNMENT.sub(r"\1<redacted>", text))


class EventLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "t": round(time.time(), 3), **redact(fields)}
        line = (json.dumps(record, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        return record


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL log; a line cut short by a killed writer is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
