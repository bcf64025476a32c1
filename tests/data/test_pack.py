from __future__ import annotations

import torch

from elastic_ft.data.pack import pack_samples
from elastic_ft.data.prepared import PAD_SLOT, DataPosition, PreparedData, rank_slots, write_blocks
from elastic_ft.data.tokenize import IGNORE_INDEX


def _samples():
    return [(f"s{i}", list(range(3, 3 + n)), [IGNORE_INDEX] + list(range(4, 3 + n)))
            for i, n in enumerate([5, 9, 3, 7, 11, 2, 6])]


def test_packing_keeps_samples_whole_and_resets_positions() -> None:
    blocks = pack_samples(_samples(), seq_len=16, pad_id=0, packing=True)
    assert sorted(s for b in blocks for s in b.sample_ids) == sorted(f"s{i}" for i in range(7))
    for block in blocks:
        assert len(block.input_ids) == len(block.labels) == len(block.position_ids) == 16
        starts = [i for i, p in enumerate(block.position_ids) if p == 0]
        # one segment per sample, plus the padding segment when there is padding
        assert len(starts) == len(block.sample_ids) + (block.real_tokens < 16)
        for start in starts:  # the first token of every segment is never a training target
            assert block.labels[start] == IGNORE_INDEX


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
    blocks = pack_samples(_samples() * 1, seq_len=8 + 4, pad_id=0, packing=False)
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
