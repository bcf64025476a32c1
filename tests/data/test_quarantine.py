from __future__ import annotations

import json

import pytest

from elastic_ft.config import DataConfig
from elastic_ft.data.pipeline import prepare_data
from elastic_ft.data.report import DataQualityError

GOOD = [{"instruction": f"Reverse the word {i}.", "input": "cat", "output": "tac"} for i in range(5)]
BAD = {
    "invalid_json": b'{"instruction": "x", "output": \n',
    "missing_field": json.dumps({"instruction": "x"}).encode() + b"\n",
    "wrong_type": json.dumps({"instruction": "x", "output": 5}).encode() + b"\n",
    "empty_text": json.dumps({"instruction": "x", "output": "   "}).encode() + b"\n",
    "invalid_utf8": b'{"instruction": "\xff\xfe", "output": "y"}\n',
    "control_chars": json.dumps({"instruction": "x\u0007", "output": "y"}).encode() + b"\n",
    "too_long": json.dumps({"instruction": "word " * 400, "output": "y"}).encode() + b"\n",
    "duplicate": json.dumps(GOOD[0]).encode() + b"\n",
}


def _corpus(tmp_path):
    lines = [json.dumps(g).encode() + b"\n" for g in GOOD] + list(BAD.values())
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"".join(lines))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fine"}]},
    ]) + "\n")
    return path, chat


def test_every_bad_row_quarantined_with_its_reason(tmp_path, tiny_assets) -> None:
    path, chat = _corpus(tmp_path)
    cfg = DataConfig(paths=[str(path), str(chat)], seq_len=64, too_long="drop",
                     max_reject_rate=1.0)
    _, report = prepare_data(cfg, str(tiny_assets), tmp_path / "out", engine="local")
    entries = [json.loads(x) for x in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    by_reason = {e["reason"]: e for e in entries}
    assert set(BAD) <= set(by_reason)
    assert [e["reason"] for e in entries if e["source"] == str(chat)] == ["bad_roles", "bad_roles"]
    assert by_reason["invalid_json"]["row"] == len(GOOD) + 1
    assert "raw_line" in by_reason["invalid_json"] and "original" in by_reason["wrong_type"]
    assert report.kept == len(GOOD) + 1  # all good rows kept, plus the good chat
    assert report.kept + report.rejected == report.rows == len(GOOD) + len(BAD) + 3
    assert report.rejected_by_reason == {**{k: 1 for k in BAD}, "bad_roles": 2}


def test_truncate_policy_and_no_trainable_tokens(tmp_path, tiny_assets) -> None:
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 100, "completion": "end"}) + "\n"
                    + json.dumps({"instruction": "short", "output": "x " * 100}) + "\n")
    cfg = DataConfig(paths=[str(path)], format="auto", seq_len=32, too_long="truncate",
                     max_reject_rate=1.0)
    from elastic_ft.data.formats import FormatError

    with pytest.raises(FormatError, match="ambiguous"):  # alpaca and completion keys in one file
        prepare_data(cfg, str(tiny_assets), tmp_path / "o", engine="local")
    path.write_text(json.dumps({"prompt": "word " * 100, "completion": "end"}) + "\n"
                    + json.dumps({"prompt": "short", "completion": "x " * 100}) + "\n")
    _, report = prepare_data(cfg, str(tiny_assets), tmp_path / "o", engine="local")
    assert report.rejected_by_reason == {"no_trainable_tokens": 1}  # prompt filled the window
    assert report.truncation_rate == 1.0 and report.kept == 1


def test_reject_rate_limit_and_nothing_survives(tmp_path, tiny_assets) -> None:
    path, _ = _corpus(tmp_path)
    cfg = DataConfig(paths=[str(path)], seq_len=64, too_long="drop", max_reject_rate=0.2)
    with pytest.raises(DataQualityError, match="exceeds data.max_reject_rate"):
        prepare_data(cfg, str(tiny_assets), tmp_path / "o1", engine="local")
    bad_only = tmp_path / "bad.jsonl"
    bad_only.write_bytes(BAD["missing_field"] + BAD["wrong_type"])
    with pytest.raises(DataQualityError, match="no rows survived"):
        prepare_data(DataConfig(paths=[str(bad_only)], format="alpaca", max_reject_rate=1.0),
                     str(tiny_assets), tmp_path / "o2", engine="local")
    assert (tmp_path / "o2" / "quarantine.jsonl").read_text().count("\n") == 2


def test_validate_data_cli(tmp_path, tiny_assets) -> None:
    from click.testing import CliRunner

    from elastic_ft.cli import main

    path, _ = _corpus(tmp_path)
    result = CliRunner().invoke(main, ["validate-data", str(path), "--tokenizer", str(tiny_assets),
                                       "--seq-len", "64", "--too-long", "drop",
                                       "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["rows"] == 13 and report["kept"] == 5 and report["rejected"] == 8
    assert sum(report["rejected_by_reason"].values()) == 8
