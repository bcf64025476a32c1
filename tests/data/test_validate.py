"""Row validation's text check: the characters it refuses are exactly Unicode's control and
surrogate characters but tab, newline and carriage return, as `unicodedata` classifies them."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from elastic_ft.data.validate import Reason, RowError, check_text


def test_refuses_exactly_the_control_and_surrogate_characters() -> None:
    allowed = {"\t", "\n", "\r"}
    refused, expected = [], []
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if unicodedata.category(char) in ("Cc", "Cs") and char not in allowed:
            expected.append(code)
        try:
            check_text(f"a{char}b", "text")
        except RowError as error:
            assert error.reason is Reason.CONTROL_CHARS
            refused.append(code)
    assert refused == expected
    assert len(expected) == 62 + 2048  # 65 Cc less 3, and the surrogates


def test_names_the_field_and_the_character_and_checks_emptiness_first() -> None:
    with pytest.raises(RowError, match=r"output holds control character '\\x07'"):
        check_text("ring \x07 the bell", "output")
    with pytest.raises(RowError) as error:
        check_text("  \n", "instruction")
    assert error.value.reason is Reason.EMPTY_TEXT
    assert check_text("", "prompt", allow_empty=True) == ""
    assert check_text("tabs\tand\r\nnewlines stay", "text") == "tabs\tand\r\nnewlines stay"
