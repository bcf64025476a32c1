"""The eval set: held out by sample before packing, or read from eval paths; counted."""

from __future__ import annotations

import json

from elastic_ft.config import DataConfig, EvalConfig
from elastic_ft.data.eval_data import EvalSet, prompt_and_reference
from elastic_ft.data.pipeline import prepare_data
from elastic_ft.data.prepared import PreparedData

ROWS = [{"instruction": f"Reverse the word number {i}.", "input": "cat", "output": f"tac {i}"}
        for i in range(120)]


def _write(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _ids(prepared_table) -> set[str]:
    return {s for block in prepared_table.column("sample_ids").to_pylist() for s in block}


def test_holdout_is_by_sample_deterministic_and_disjoint(tmp_path, tiny_assets) -> None:
    bad = {"instruction": "x"}  # quarantined: in neither set
    source = _write(tmp_path / "a.jsonl", ROWS + [bad, ROWS[0]])  # and a duplicate
    cfg = DataConfig(paths=[source], seq_len=64, max_reject_rate=1.0)
    split = EvalConfig(holdout_fraction=0.2)
    prepared, report = prepare_data(cfg, str(tiny_assets), tmp_path / "o1", engine="local",
                                    evaluation=split)
    evalset = EvalSet.open(tmp_path / "o1")
    train_ids, eval_ids = _ids(prepared.table), _ids(evalset.table)
    assert not train_ids & eval_ids
    assert len(train_ids) + len(eval_ids) == report.kept == 120
    assert 0.1 * 120 < len(eval_ids) < 0.3 * 120
    saved = json.loads((tmp_path / "o1" / "data_report.json").read_text())
    assert saved["eval"]["source"] == "holdout" and saved["eval"]["samples"] == len(eval_ids)
    assert saved["eval"]["blocks"] == len(evalset.table)
    assert saved["rejected"] == 2  # the bad row and the duplicate, quarantined as before

    # by content, not position: the same rows are held out from reordered sources
    again = _write(tmp_path / "b.jsonl", list(reversed(ROWS)))
    _, _ = prepare_data(DataConfig(paths=[again], seq_len=64), str(tiny_assets), tmp_path / "o2",
                        engine="local", evaluation=split)
    held_a = {int(s.rsplit(":", 1)[1]) - 1 for s in eval_ids}  # rows are numbered from 1
    held_b = {120 - int(s.rsplit(":", 1)[1]) for s in _ids(EvalSet.open(tmp_path / "o2").table)}
    assert held_a == held_b

    # without eval the set is gone, and a cached run keeps its eval set
    prepare_data(cfg, str(tiny_assets), tmp_path / "o1", engine="local")
    assert EvalSet.open(tmp_path / "o1") is None


def test_eval_paths_validated_apart_with_their_own_quarantine(tmp_path, tiny_assets) -> None:
    train = _write(tmp_path / "train.jsonl", ROWS[:60])
    held = _write(tmp_path / "eval.jsonl", ROWS[60:70] + [{"instruction": "no output"}])
    prepared, report = prepare_data(
        DataConfig(paths=[train], seq_len=64), str(tiny_assets), tmp_path / "o",
        engine="local", evaluation=EvalConfig(paths=[held]))
    evalset = EvalSet.open(tmp_path / "o")
    assert len(_ids(evalset.table)) == 10 and len(_ids(prepared.table)) == 60
    assert report.eval == {"source": "paths", "rows": 11, "kept": 10, "rejected": 1,
                           "samples": 10, "blocks": len(evalset.table),
                           "trainable_tokens": report.eval["trainable_tokens"]}
    quarantined = (tmp_path / "o" / "eval_quarantine.jsonl").read_text().splitlines()
    assert len(quarantined) == 1 and "missing_field" in quarantined[0]
    # the prompts to generate from end where the training loss starts: the assistant header
    from elastic_ft.data.tokenize import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_assets))
    first = evalset.prompts[0]
    text = tokenizer.decode(first["prompt_ids"])
    assert "Reverse the word number 60." in text and text.endswith("### Assistant:\n")
    assert tokenizer.decode(first["reference_ids"]).startswith("tac 60")
    assert PreparedData(evalset.table).trainable_tokens(list(range(len(evalset.table)))) == (
        report.eval["trainable_tokens"])


def test_prompt_of_a_fully_trained_sample_is_its_first_half() -> None:
    prompt, reference = prompt_and_reference([1, 2, 3, 4, 5, 6], [-100, 2, 3, 4, 5, 6])
    assert prompt == [1, 2, 3] and reference == [4, 5, 6]


def test_prompts_are_rendered_as_training_renders_a_user_turn(tmp_path, tiny_assets) -> None:
    """The held-out rows' prompts and `eval.prompts` reach generation as the same tokens that
    precede the answer in training."""
    from elastic_ft.config import load_config
    from elastic_ft.core.evaluate import prompt_records
    from elastic_ft.data.tokenize import load_tokenizer, render_prompt, tokenize_rows
    from tests.conftest import ROOT

    tokenizer = load_tokenizer(str(tiny_assets))
    text = "Reverse the word.\ncat"
    for template in ("default", "chat_template", "auto"):
        ((ids, labels),) = tokenize_rows([{"messages": [
            {"role": "user", "content": text}, {"role": "assistant", "content": "tac"}]}],
            tokenizer, "completion", template)
        prompt, reference = prompt_and_reference(ids, labels)
        assert render_prompt(text, tokenizer, template) == prompt, template
        assert tokenizer.decode(reference, skip_special_tokens=True) == "tac"

    listed = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": str(tiny_assets), "output_dir": str(tmp_path),
        "eval.holdout_fraction": 0.1, "eval.prompts": [text, "Hi"]})
    records = prompt_records(listed, held_out=[{"prompt_ids": [9]}])
    assert listed.data.template == "auto"  # the last template above: the config's
    assert [r["prompt_ids"] for r in records] == [prompt, render_prompt("Hi", tokenizer,
                                                                        "auto")]
    lines = tmp_path / "prompts.txt"
    lines.write_text(json.dumps({"prompt": text}) + "\n\nHi\n")
    from_file = prompt_records(listed.model_copy(update={"eval": listed.eval.model_copy(
        update={"prompts": str(lines)})}), held_out=[])
    assert [r["prompt_ids"] for r in from_file] == [r["prompt_ids"] for r in records]
    unset = listed.model_copy(update={"eval": listed.eval.model_copy(update={"prompts": None})})
    assert prompt_records(unset, held_out=[{"prompt_ids": [9]}]) == [{"prompt_ids": [9]}]
