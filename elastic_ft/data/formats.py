"""Detect a source's format and normalise its rows to one canonical schema.

Canonical row (exactly one of the three payloads is set):
    {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    {"prompt": str, "completion": str}
    {"text": str}
    {"input_ids": [int], "labels": [int] | None}
Alpaca and ShareGPT become `messages`; a bad row raises `RowError` with a stable reason code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from elastic_ft.data.validate import Reason, RowError, check_text

# Required keys per format; detection looks for these in the rows' keys.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "tokenized": ("input_ids",),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}


class FormatError(ValueError):
    """A whole source cannot be read as one format."""


def apply_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename source columns to canonical names (`columns` maps canonical -> source)."""
    if not columns:
        return record
    renamed = dict(record)
    for canonical, source in columns.items():
        if source in renamed:
            renamed[canonical] = renamed.pop(source)
    return renamed


def detect_format(source: str, records: Iterable[dict[str, Any]]) -> str:
    """The one format whose required keys appear in the sampled rows, else a FormatError."""
    seen: set[str] = set()
    for record in records:
        seen.update(record)
    matches = [name for name, keys in SIGNATURES.items() if all(k in seen for k in keys)]
    # alpaca rows often carry a `text` column with the rendered prompt: the richer format wins.
    if len(matches) > 1 and "text" in matches:
        matches.remove("text")
    if len(matches) == 1:
        return matches[0]
    fields = ", ".join(sorted(seen)) or "(no fields)"
    if not matches:
        raise FormatError(
            f"{source}: matches no known format; fields seen: {fields}. "
            "Set data.format and data.columns to map them."
        )
    raise FormatError(
        f"{source}: ambiguous, matches {', '.join(matches)}; fields seen: {fields}. "
        "Set data.format to choose one."
    )


def _require(record: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in record or record[key] is None:
        raise RowError(Reason.MISSING_FIELD, f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise RowError(Reason.WRONG_TYPE, f"field {key!r} is {type(value).__name__}")
    return value


def _optional_text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if value is None or (isinstance(value, float) and value != value):  # csv NaN
        return ""
    if not isinstance(value, str):
        raise RowError(Reason.WRONG_TYPE, f"field {key!r} is {type(value).__name__}")
    return value


def _check_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(body))]
    if body != expected:
        raise RowError(Reason.BAD_ROLES, f"roles out of order: {roles}")
    if "assistant" not in body:
        raise RowError(Reason.BAD_ROLES, "no assistant turn")
    for message in messages:
        check_text(message["content"], f"{message['role']} content")
    return messages


def _messages(turns: Any, role_key: str, content_key: str, role_map: dict[str, str] | None,
              field: str) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise RowError(Reason.WRONG_TYPE, f"field {field!r} is {type(turns).__name__}")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise RowError(Reason.WRONG_TYPE, f"a turn in {field!r} is {type(turn).__name__}")
        role = _require(turn, role_key, str)
        content = _require(turn, content_key, str)
        role = role_map.get(role, role) if role_map else role
        if role not in ("system", "user", "assistant"):
            raise RowError(Reason.BAD_ROLES, f"unknown role {role!r}")
        messages.append({"role": role, "content": content})
    return _check_messages(messages)


def normalise(record: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Canonical payload for one raw record of format `fmt`; raises RowError."""
    if fmt == "alpaca":
        instruction = _require(record, "instruction", str)
        output = _require(record, "output", str)
        extra = _optional_text(record, "input")
        prompt = instruction + (f"\n{extra}" if extra.strip() else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        system = _optional_text(record, "system")
        if system.strip():
            messages.insert(0, {"role": "system", "content": system})
        return {"messages": _check_messages(messages)}
    if fmt == "chat":
        return {"messages": _messages(record.get("messages"), "role", "content", None, "messages")
                if "messages" in record else _missing("messages")}
    if fmt == "sharegpt":
        if "conversations" not in record:
            _missing("conversations")
        return {"messages": _messages(record["conversations"], "from", "value", SHAREGPT_ROLES,
                                      "conversations")}
    if fmt == "completion":
        prompt = check_text(_require(record, "prompt", str), "prompt", allow_empty=True)
        completion = check_text(_require(record, "completion", str), "completion")
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        return {"text": check_text(_require(record, "text", str), "text")}
    if fmt == "tokenized":
        ids = _int_list(_require(record, "input_ids", list), "input_ids")
        if not ids:
            raise RowError(Reason.EMPTY_TEXT, "input_ids is empty")
        labels = record.get("labels")
        if labels is not None:
            labels = _int_list(labels, "labels")
            if len(labels) != len(ids):
                raise RowError(Reason.WRONG_TYPE, "labels and input_ids differ in length")
        return {"input_ids": ids, "labels": labels}
    raise FormatError(f"unknown format {fmt!r}; allowed: {', '.join(SIGNATURES)}")


def _missing(key: str) -> Any:
    raise RowError(Reason.MISSING_FIELD, f"missing field {key!r}")


def _int_list(value: Any, field: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise RowError(Reason.WRONG_TYPE, f"field {field!r} must be a list of integers")
    return value
