"""Row validation: stable reason codes, and the quarantine file every rejected row goes to."""

from __future__ import annotations

import json
import re
from enum import Enum
from pathlib import Path
from typing import Any


class Reason(str, Enum):
    """Stable reason codes; they appear in quarantine.jsonl and the data report."""

    INVALID_JSON = "invalid_json"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_TEXT = "empty_text"
    INVALID_UTF8 = "invalid_utf8"
    CONTROL_CHARS = "control_chars"
    BAD_ROLES = "bad_roles"
    TOO_LONG = "too_long"
    DUPLICATE = "duplicate"
    NO_TRAINABLE_TOKENS = "no_trainable_tokens"
    TEMPLATE_REFUSED = "template_refused"  # the model's chat template raised on the row


class RowError(ValueError):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


# Unicode's control (Cc: C0, DEL, C1) and surrogate (Cs) characters, but tab, newline and
# carriage return; searched in C, where a loop over `unicodedata.category` made a long row cost
# a Python step per character (tests/data/test_validate.py checks it against every code point)
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def check_text(text: str, field: str, allow_empty: bool = False) -> str:
    if not allow_empty and not text.strip():
        raise RowError(Reason.EMPTY_TEXT, f"{field} is empty")
    if bad := _BAD_CHARS.search(text):
        raise RowError(Reason.CONTROL_CHARS, f"{field} holds control character {bad.group()!r}")
    return text


class Quarantine:
    """Append-only `quarantine.jsonl`: original row or raw line, source, row number, reason."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def add(self, source: str, row: int, reason: str, detail: str, raw: Any) -> None:
        entry = {"source": source, "row": row, "reason": reason, "detail": detail}
        entry["original" if isinstance(raw, (dict, list)) else "raw_line"] = raw
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.count += 1

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Quarantine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
