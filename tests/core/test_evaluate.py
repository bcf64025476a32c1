"""Eval loss over all eval tokens by all ranks together: the same figure at any world size,
equal to a plain Hugging Face computation; greedy samples equal Hugging Face's under ZeRO-3."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from elastic_ft.config import load_config
from elastic_ft.core.evaluate import eval_block_count, eval_due, eval_slots
from elastic_ft.data.prepared import PAD_SLOT
from tests.conftest import ROOT, random_blocks, spawn_ranks

PROMPT = [1, 45, 77, 300, 12]


def test_eval_due_at_the_interval_and_at_the_end() -> None:
    assert [s for s in range(0, 11) if eval_due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(0, 11) if eval_due(s, None, 10)] == [10]


def test_eval_cap_takes_the_first_batches_whatever_the_world_size() -> None:
    assert eval_block_count(100, 8, None) == 100
    assert eval_block_count(100, 8, 3) == 24
    assert eval_block_count(10, 8, 3) == 10


@pytest.mark.parametrize("n_blocks,world,micro", [(7, 2, 3), (1, 4, 2), (12, 3, 4), (5, 1, 2)])
def test_eval_slots_cover_each_block_once_in_lockstep(n_blocks, world, micro) -> None:
    shares = [eval_slots(n_blocks, world, r, micro) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # as many forwards on every rank
    blocks = [b for share in shares for batch in share for b in batch if b != PAD_SLOT]
    assert sorted(blocks) == list(range(n_blocks))
    assert all(len(batch) == micro for share in shares for batch in share)


def _eval_table(tmp: Path):
    from elastic_ft.data.prepared import PreparedData

    return PreparedData.open(tmp / "eval").table


def _rank(rank: int, world: int, micro: int, port: int, tiny_assets: str, tmp: str) -> None:
    import torch.distributed as dist

    from elastic_ft.core.engine import build_engine
    from elastic_ft.core.evaluate import eval_loss, generate
    from elastic_ft.core.model import load_model
    from elastic_ft.core.probe import local_process_group
    from elastic_ft.resources.planning import WorkerPlan

    local_process_group(rank, world, port)
    table = _eval_table(Path(tmp))
    cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": tiny_assets, "output_dir": tmp, "method.kind": "full",
        "deepspeed.zero_stage": 3})
    plan = WorkerPlan((micro,) * world, 1, micro * world, micro * world, 1.0, "test")
    engine, _ = build_engine(cfg, load_model(cfg), plan, 1, False, rank)
    loss, tokens = eval_loss(engine, table, len(table), micro, rank, world)
    completion = generate(engine, [PROMPT], 6, synced=True, pad_id=0)[0]
    if rank == 0:
        Path(tmp, f"eval_{world}.json").write_text(json.dumps(
            {"loss": loss, "tokens": tokens, "completion": completion}))
    dist.destroy_process_group()


def test_eval_loss_is_the_same_at_any_world_size_and_equals_hugging_face(
        tmp_path, tiny_assets) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from elastic_ft.core.ports import free_port

    random_blocks(tmp_path / "eval", 30, seed=5)  # once: two ranks writing it would race
    for world, micro in ((2, 3), (1, 2)):
        spawn_ranks(_rank, world, world, micro, free_port(), str(tiny_assets), str(tmp_path))
    two, one = (json.loads((tmp_path / f"eval_{w}.json").read_text()) for w in (2, 1))
    assert two["tokens"] == one["tokens"] > 300
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-4)

    # the same mean over every trainable token, computed by plain Hugging Face, one block
    # at a time; and its greedy completion
    table = _eval_table(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(table)):
            ids = torch.tensor([table.column("input_ids")[i].as_py()])
            labels = torch.tensor([table.column("labels")[i].as_py()])
            positions = torch.tensor([table.column("position_ids")[i].as_py()])
            logits = model(input_ids=ids, position_ids=positions,
                           use_cache=False).logits[0, :-1]  # no cache: packed masks
            targets = labels[0, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits.float(), targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
        expected = model.generate(torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)[0, len(PROMPT):].tolist()
    assert count == one["tokens"]
    assert one["loss"] == pytest.approx(total / count, abs=1e-4)
    assert two["completion"] == one["completion"] == expected
