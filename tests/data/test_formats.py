from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from elastic_ft.config import DataConfig
from elastic_ft.data.formats import FormatError
from elastic_ft.data.pipeline import prepare_data, resolve_formats


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


CASES = {
    "alpaca": [{"instruction": "Reverse the word.", "input": "cat", "output": "tac"}],
    "chat": [{"messages": [{"role": "user", "content": "hi"},
                           {"role": "assistant", "content": "hello"}]}],
    "sharegpt": [{"conversations": [{"from": "human", "value": "hi"},
                                    {"from": "gpt", "value": "hello"}]}],
    "completion": [{"prompt": "2 + 2 =", "completion": " 4"}],
    "text": [{"text": "plain text for pre-training"}],
    "tokenized": [{"input_ids": [5, 6, 7, 8], "labels": [-100, 6, 7, 8]}],
}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_jsonl_detected_and_normalised(tmp_path, tiny_assets, fmt) -> None:
    # the third row differs only in a field the format ignores: same canonical content
    path = _write_jsonl(tmp_path / f"{fmt}.jsonl", CASES[fmt] * 2 + [
        dict(CASES[fmt][0], _ignored=1)])
    cfg = DataConfig(paths=[str(path)], seq_len=64, max_reject_rate=1.0)
    assert resolve_formats(cfg) == {str(path): fmt}
    prepared, report = prepare_data(cfg, str(tiny_assets), tmp_path / "out", engine="local")
    assert report.rows == 3 and report.kept + report.rejected == 3
    assert report.rejected_by_reason == {"duplicate": 2} and report.kept == 1
    assert report.trainable_tokens > 0


def test_other_file_types(tmp_path, tiny_assets) -> None:
    rows = CASES["alpaca"] + [{"instruction": "Add.", "input": "1 + 2", "output": "3"}]
    pa_table = pa.Table.from_pylist(rows)
    pq.write_table(pa_table, tmp_path / "a.parquet")
    feather.write_feather(pa_table, tmp_path / "b.arrow")
    (tmp_path / "c.json").write_text(json.dumps(CASES["sharegpt"]))
    (tmp_path / "d.csv").write_text("prompt,completion\nhello,world\n12,34\n")
    import datasets

    datasets.Dataset.from_list(CASES["chat"]).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(paths=[str(tmp_path / "*.parquet"), str(tmp_path / "b.arrow"),
                            str(tmp_path / "c.json"), str(tmp_path / "d.csv"),
                            str(tmp_path / "saved")], seq_len=64)
    formats = resolve_formats(cfg)
    assert sorted(formats.values()) == ["alpaca", "alpaca", "chat", "completion", "sharegpt"]
    _, report = prepare_data(cfg, str(tiny_assets), tmp_path / "out", engine="local")
    # arrow repeats the parquet rows and the saved chat repeats the ShareGPT one: dedup is per run,
    # on canonical content, across sources
    assert report.rows == 8 and report.kept == 5
    assert report.rejected_by_reason == {"duplicate": 3}


def test_ambiguous_and_unknown_sources_name_their_fields(tmp_path) -> None:
    both = _write_jsonl(tmp_path / "both.jsonl", [{"messages": [], "conversations": []}])
    with pytest.raises(FormatError, match=r"both.jsonl: ambiguous.*conversations, messages"):
        resolve_formats(DataConfig(paths=[str(both)]))
    none = _write_jsonl(tmp_path / "none.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(FormatError, match=r"none.jsonl: matches no known format.*answer, question"):
        resolve_formats(DataConfig(paths=[str(none)]))


def test_column_mapping_overrides(tmp_path, tiny_assets) -> None:
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a."}])
    cfg = DataConfig(paths=[str(path)], format="completion",
                     columns={"prompt": "question", "completion": "answer"}, seq_len=32)
    _, report = prepare_data(cfg, str(tiny_assets), tmp_path / "out", engine="local")
    assert report.kept == 1
