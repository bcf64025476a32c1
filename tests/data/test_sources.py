"""Data sources: `save_to_disk` folders read at their split, hub datasets through the real
`datasets.load_dataset` (on local folders: no hub here), and hub names told from typos."""

from __future__ import annotations

import json

import pytest

from elastic_ft.config import DataConfig, DataSource
from elastic_ft.data.pipeline import prepare_data
from elastic_ft.data.readers import read_source
from elastic_ft.data.sources import SourceError, expand_sources, is_hub_name

ROWS = [{"instruction": f"Reverse word {i}.", "input": "cat", "output": f"tac {i}"}
        for i in range(30)]


def _saved_dict(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:20]),
                          "test": datasets.Dataset.from_list(ROWS[20:])}).save_to_disk(folder)
    return folder


def _rows(source: str) -> list[dict]:
    return [json.loads(r["payload"]) for r in read_source(source)]


def test_saved_dataset_dict_reads_one_split_not_its_files(tmp_path) -> None:
    folder = _saved_dict(tmp_path)
    (train,) = expand_sources([str(folder)])  # a plain path: the train split
    assert [r["instruction"] for r in _rows(train)] == [r["instruction"] for r in ROWS[:20]]
    (test,) = expand_sources([DataSource(path=str(folder), split="test")])
    assert [r["output"] for r in _rows(test)] == [r["output"] for r in ROWS[20:]]
    with pytest.raises(SourceError, match=r"without split 'validation' \(splits: train, test\)"):
        expand_sources([DataSource(path=str(folder), split="validation")])


def test_dataset_spec_goes_through_load_dataset(tmp_path, tiny_assets) -> None:
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[:10]) + "\n")
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS[10:]) + "\n")
    spec = DataSource(path=str(folder), data_files=["b.jsonl"], split="train")
    (source,) = expand_sources([spec])
    assert source.startswith("hf://") and "data_files=b.jsonl" in source
    assert len(_rows(source)) == 20
    _, report = prepare_data(DataConfig(paths=[spec], seq_len=64), str(tiny_assets),
                             tmp_path / "out", engine="local")
    assert report.rows == report.kept == 20


@pytest.mark.parametrize("name", ["teknium/OpenHermes-2.5", "HuggingFaceH4/ultrachat_200k",
                                  "squad"])
def test_hub_names_are_recognised(name) -> None:
    assert is_hub_name(name)
    (source,) = expand_sources([name])
    assert source == f"hf://{name}?split=train"


@pytest.mark.parametrize("missing", ["data/missing.jsonl", "./mine", "/abs/path/x",
                                     "bad//name", "a/b/c"])
def test_a_missing_path_that_is_no_hub_name_says_so(missing) -> None:
    with pytest.raises(SourceError, match="not found locally and not a valid hub dataset name"):
        expand_sources([missing])


def test_a_local_path_wins_over_a_hub_name(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    (tmp_path / "org" / "name" / "rows.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    assert expand_sources(["org/name"]) == ["org/name/rows.jsonl"]
