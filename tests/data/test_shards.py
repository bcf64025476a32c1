"""The workers' shards: the prepared blocks in a real Ray object store, each rank reading its
micro-batches along the schedule. The full runs,
resized mid-epoch, are in tests/integration (test_train.py, test_elastic.py: every sample id
trained exactly once)."""

from __future__ import annotations

import random

import pytest

from elastic_ft.data.pack import Samples, pack_samples
from elastic_ft.data.prepared import (
    PAD_SLOT,
    DataPosition,
    PreparedData,
    rank_micro_batches,
    rank_slots,
    write_blocks,
)
from elastic_ft.data.tokenize import IGNORE_INDEX


def _prepared(tmp_path, n_samples: int = 23) -> PreparedData:
    rng = random.Random(3)
    samples = []
    for i in range(n_samples):
        n = rng.randint(2, 11)
        samples.append((f"s{i}", [rng.randint(3, 90) for _ in range(n)],
                        [IGNORE_INDEX] + [rng.randint(3, 90) for _ in range(n - 1)]))
    write_blocks(pack_samples(Samples.from_lists(samples), seq_len=12, pad_id=0, packing=False), tmp_path)
    return PreparedData.open(tmp_path)


@pytest.mark.parametrize(("micro", "accum", "global_batch"),
                         [((4,), 2, 8), ((2, 2), 2, 8), ((1, 1, 1), 3, 8), ((2, 2, 2, 2), 1, 8),
                          ((3, 3), 1, 5), ((3, 1), 2, 8), ((1, 2, 1), 2, 8), ((5, 2, 1), 1, 8)])
def test_rank_stream_is_the_schedule_step_by_step(tmp_path, micro, accum, global_batch):
    world = len(micro)
    data = _prepared(tmp_path)
    start = DataPosition(epoch=0, consumed=5)  # a resume in the middle of an epoch
    steps = 9  # crosses into the next epochs, with a short last batch in each
    for rank in range(world):
        expected: list[int] = []
        position = start
        for _ in range(steps):
            indices, position = data.global_batch(position, global_batch, seed=7, shuffle=True)
            for slot in rank_slots(indices, micro, rank, accum):
                assert len(slot) == micro[rank]
                expected.append(slot)
        assert list(rank_micro_batches(len(data), start, steps, global_batch, 7, True, micro,
                                       rank, accum)) == expected


def _read_all(feed, n: int) -> list[dict]:
    from elastic_ft.data.shards import ShardReader

    reader = ShardReader(feed, prefetch_batches=2)
    got = [reader.next() for _ in range(n)]
    with pytest.raises(RuntimeError, match="data shard ended before the schedule did"):
        reader.next()
    reader.close()
    return got


@pytest.mark.ray
@pytest.mark.parametrize("block_bytes", [1 << 30, 200])  # one block; many blocks of ~2 rows
def test_each_rank_reads_its_scheduled_blocks_in_order(ray_local, tmp_path, block_bytes):
    import numpy as np

    from elastic_ft.data.shards import RankFeed, split_for_store, store_blocks

    data = _prepared(tmp_path)
    # an uneven split: rank 0 trains 3 blocks per micro-step, rank 1 one
    world, micro, accum, global_batch, steps = 2, (3, 1), 2, 8, 7
    start = DataPosition(epoch=1, consumed=8)
    schedule = {"position": start.to_dict(), "steps": steps, "world_size": world,
                "micro_batches": list(micro), "grad_accum": accum, "global_batch": global_batch,
                "seed": 5, "shuffle": True}
    parts = split_for_store(data.table, block_bytes)
    assert (len(parts) == 1) == (block_bytes > data.table.nbytes)
    blocks = store_blocks(data.table, block_bytes)
    assert len(blocks.refs) == len(parts) and blocks.first_rows[-1] == len(data)
    assert blocks.first_rows == [0, *np.cumsum([len(p) for p in parts]).tolist()]
    delivered: list[int] = []
    for rank in range(world):
        feed = RankFeed(blocks.refs, blocks.first_rows, schedule, rank)
        expected = _schedule_slots(data, start, steps, global_batch, rank, micro, accum)
        got = _read_all(feed, len(expected))
        assert [b["slot"].tolist() for b in got] == expected
        for batch, slot in zip(got, expected, strict=True):
            reference = data.batch(slot)  # the tokens PreparedData itself would give
            for name in ("input_ids", "labels", "position_ids"):
                assert np.array_equal(batch[name], reference[name].numpy()), name
            delivered.extend(s for s in slot if s != PAD_SLOT)
    # together the ranks got each scheduled global batch exactly once, nothing else
    scheduled, position = [], start
    for _ in range(steps):
        indices, position = data.global_batch(position, global_batch, seed=5, shuffle=True)
        scheduled.extend(indices)
    assert sorted(delivered) == sorted(scheduled)


def _schedule_slots(data: PreparedData, position: DataPosition, steps: int, global_batch: int,
                    rank: int, micro: tuple[int, ...], accum: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        indices, position = data.global_batch(position, global_batch, seed=5, shuffle=True)
        out.extend(rank_slots(indices, micro, rank, accum))
    return out


@pytest.mark.ray
def test_a_rank_holds_only_the_blocks_it_reads(ray_local, tmp_path):
    """Many small blocks: the cache never holds more than its bound, an all-padding
    micro-batch is all masked, and a block that cannot be read fails the reader's next()."""
    import numpy as np

    from elastic_ft.data.shards import BlockCache, RankFeed, store_blocks

    data = _prepared(tmp_path)
    blocks = store_blocks(data.table, 200)
    refs, first_rows = blocks.refs, blocks.first_rows
    assert len(refs) > 4
    cache = BlockCache(refs, first_rows, max_blocks=2)
    for slots in ([0, 1], [len(data) - 1, 5, PAD_SLOT], [7, 3, 11]):
        batch = cache.take(slots)
        reference = data.batch(slots)
        for name in ("input_ids", "labels", "position_ids"):
            assert np.array_equal(batch[name], reference[name].numpy()), name
        assert len(cache._tables) <= max(2, len(slots))
    padding = cache.take([PAD_SLOT, PAD_SLOT])
    assert (padding["labels"] == IGNORE_INDEX).all() and padding["input_ids"].shape[0] == 2

    from elastic_ft.data.shards import ShardReader

    schedule = {"position": DataPosition().to_dict(), "steps": 2, "micro_batches": [2],
                "grad_accum": 1, "global_batch": 2, "seed": 0, "shuffle": False}
    reader = ShardReader(RankFeed(refs, first_rows, schedule, 0), prefetch_batches=1)
    assert reader.next()["slot"].tolist() == [0, 1]
    reader.close()
    # metadata that promises rows block 0 does not have: the error reaches the training thread
    broken = ShardReader(RankFeed(refs[:1], [0, len(data)], dict(schedule, position={
        "epoch": 0, "consumed": len(data) - 2}), 0), prefetch_batches=1)
    with pytest.raises(RuntimeError, match="reading this rank's data failed"):
        broken.next()
