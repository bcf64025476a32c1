from __future__ import annotations

import numpy as np
import pytest
import torch

from elastic_ft.data.pack import BlockPacker, Samples, concat_blocks, pack_samples
from elastic_ft.data.prepared import PAD_SLOT, DataPosition, PreparedData, rank_slots, write_blocks
from elastic_ft.data.tokenize import IGNORE_INDEX


def _samples():
    return [(f"s{i}", list(range(3, 3 + n)), [IGNORE_INDEX] + list(range(4, 3 + n)))
            for i, n in enumerate([5, 9, 3, 7, 11, 2, 6])]


def _per_block(blocks) -> list[list[str]]:
    """Each block's sample ids (`Blocks` keeps them flat, with a count per block)."""
    ends = np.cumsum(blocks.sample_counts).tolist()
    return [blocks.sample_ids[a:b] for a, b in zip([0] + ends[:-1], ends, strict=True)]


def _one_by_one(samples, seq_len: int, pad_id: int, packing: bool) -> list[dict]:
    """The packing rule written out a sample and a token at a time: what the columnar
    packer must give."""
    blocks: list[dict] = []
    for sample_id, ids, labels in samples:
        last = blocks[-1] if blocks else None
        if last is None or not packing or len(last["ids"]) + len(ids) > seq_len:
            last = {"ids": [], "labels": [], "pos": [], "samples": []}
            blocks.append(last)
        last["ids"] += ids
        last["labels"] += labels
        last["pos"] += list(range(len(ids)))
        last["samples"].append(sample_id)
    for block in blocks:
        missing = seq_len - len(block["ids"])
        block["real"] = len(block["ids"])
        block["trainable"] = sum(x != IGNORE_INDEX for x in block["labels"])
        block["ids"] += [pad_id] * missing
        block["labels"] += [IGNORE_INDEX] * missing
        block["pos"] += list(range(missing))
    return blocks


def test_packing_keeps_samples_whole_and_resets_positions() -> None:
    blocks = pack_samples(Samples.from_lists(_samples()), seq_len=16, pad_id=0, packing=True)
    assert sorted(blocks.sample_ids) == sorted(f"s{i}" for i in range(7))
    assert blocks.input_ids.shape == blocks.labels.shape == blocks.position_ids.shape
    assert blocks.input_ids.shape[1] == 16
    for i, sample_ids in enumerate(_per_block(blocks)):
        starts = np.flatnonzero(blocks.position_ids[i] == 0)
        # one segment per sample, plus the padding segment when there is padding
        assert len(starts) == len(sample_ids) + (blocks.real_tokens[i] < 16)
        # the first token of every segment is never a training target
        assert (blocks.labels[i][starts] == IGNORE_INDEX).all()


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_columnar_packing_in_any_batches_matches_the_rule(seed: int, packing: bool) -> None:
    """The stream arrives in batches of any size (Ray Data's blocks): the blocks must be
    those of packing the samples one by one, whatever the cut."""
    rng = np.random.default_rng(seed)
    seq_len = int(rng.integers(8, 40))
    samples = []
    for i in range(int(rng.integers(1, 120))):
        n = int(rng.integers(1, seq_len + 1))
        ids = rng.integers(3, 500, n).tolist()
        samples.append((f"r{i}", ids, [IGNORE_INDEX] + [
            x if rng.random() < 0.7 else IGNORE_INDEX for x in ids[1:]]))
    cuts = sorted(set(rng.integers(0, len(samples) + 1, int(rng.integers(0, 8))).tolist()))
    packer = BlockPacker(seq_len, pad_id=1, packing=packing)
    parts = [packer.add(Samples.from_lists(samples[a:b]))
             for a, b in zip([0] + cuts, cuts + [len(samples)], strict=True)]
    got = concat_blocks([p for p in parts + [packer.finish()] if p is not None], seq_len)
    want = _one_by_one(samples, seq_len, 1, packing)
    assert len(got) == len(want)
    assert list(_per_block(got)) == [b["samples"] for b in want]
    assert got.input_ids.tolist() == [b["ids"] for b in want]
    assert got.labels.tolist() == [b["labels"] for b in want]
    assert got.position_ids.tolist() == [b["pos"] for b in want]
    assert got.trainable_tokens.tolist() == [b["trainable"] for b in want]
    assert got.real_tokens.tolist() == [b["real"] for b in want]


def test_a_sample_longer_than_a_block_is_refused() -> None:
    with pytest.raises(ValueError, match="s0 has 9 tokens > seq_len 8"):
        pack_samples(Samples.from_lists([("s0", [5] * 9, [5] * 9)]), 8, 0, True)


def test_packed_block_does_not_attend_across_samples(tiny_assets) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets, attn_implementation="sdpa").eval()
    a, b = [1, 40, 41, 42, 43], [1, 50, 51, 52]
    packed = torch.tensor([a + b])
    positions = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    with torch.no_grad():
        # use_cache=False as in training: a KV cache turns packed-sequence detection off
        together = model(input_ids=packed, position_ids=positions,
                         use_cache=False).logits[0, len(a):]
        alone = model(input_ids=torch.tensor([b]), use_cache=False).logits[0]
        leaky = model(input_ids=packed, position_ids=positions).logits[0, len(a):]
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(leaky, alone, atol=1e-3)  # the test can tell a leak apart


def test_resume_at_other_world_size_covers_each_sample_once(tmp_path) -> None:
    blocks = pack_samples(Samples.from_lists(_samples()), seq_len=8 + 4, pad_id=0,
                          packing=False)
    data = write_blocks(blocks, tmp_path)
    data = PreparedData.open(tmp_path)
    global_batch = 3
    seen: list[int] = []
    position = DataPosition()
    # two steps at W=2 split unevenly (2 + 1), then a resume at W=1
    for micro_batches, accum in [((2, 1), 1), ((1, 2), 1), ((1,), 3)]:
        indices, position = data.global_batch(position, global_batch, seed=7, shuffle=True)
        for rank in range(len(micro_batches)):
            for slot in rank_slots(indices, micro_batches, rank, accum):
                seen.extend(i for i in slot if i != PAD_SLOT)
    assert sorted(seen) == list(range(len(data)))
    assert position == DataPosition(epoch=1, consumed=0)
