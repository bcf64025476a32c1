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

# A key names a secret when its last word is one (`HF_TOKEN`, `wandb_api_key`,
# `aws_secret_access_key`, `password`), not when a word merely contains one: `tokenizer`,
# `max_new_tokens`, `pad_token_id` and `tokens_per_s` are settings and figures, kept as they are.
_SECRET_KEY = r"(?:[A-Za-z0-9]+[_.-])*?(?:token|secret|password|passwd|credentials?|" \
    r"(?:api|access|secret|private|auth)[_-]?key)"
_SECRET_KEY_RE = re.compile(rf"^{_SECRET_KEY}$", re.IGNORECASE)
# values that are credentials whatever their key: Hugging Face and OpenAI-style tokens
_SECRET_VALUE = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})\b")


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY_RE.match(key))


def redact(value: Any) -> Any:
    """Drop anything that looks like a credential before it reaches a log or a saved config."""
    if isinstance(value, dict):
        return {k: ("<redacted>" if is_secret_key(str(k)) else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return _SECRET_VALUE.sub("<redacted>", _URI_CREDENTIALS.sub(r"\1<redacted>@", value))
    return value


# `HF_TOKEN=hf_abc`, `"api_key": "x"`, `password: x` in free text
_SECRET_ASSIGNMENT = re.compile(
    rf"(\b{_SECRET_KEY}[\"']?\s*[:=]\s*[\"']?)[^\s\"',}}]+", re.IGNORECASE)


# `s3://KEY:SECRET@bucket/path`: pyarrow takes credentials in a storage URI
_URI_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def redact_text(text: str) -> str:
    """`HF_TOKEN=hf_abc` -> `HF_TOKEN=<redacted>` in free text such as streamed job logs."""
    text = _SECRET_ASSIGNMENT.sub(r"\1<redacted>", text)
    return _SECRET_VALUE.sub("<redacted>", _URI_CREDENTIALS.sub(r"\1<redacted>@", text))


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


def read_steps(path: str | Path) -> list[dict[str, Any]]:
    """The training-step rows of `metrics.jsonl` (eval rows, which have `eval_loss` and no
    `loss`, left out)."""
    return [r for r in read_events(path) if "loss" in r]
