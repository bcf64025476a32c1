"""The workers' shards: Ray Train's dataset sharding (a real `DataConfig.configure` over a real
Ray Data stream) cut along the schedule. The full runs, resized mid-epoch, are in
tests/integration (test_train.py, test_elastic.py: every sample id trained exactly once)."""

from __future__ import annotations

import random

import pytest

from elastic_ft.data.pack import pack_samples
from elastic_ft.data.prepared import (
    PAD_SLOT,
    DataPosition,
    PreparedData,
    rank_slots,
    rank_stream,
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
    write_blocks(pack_samples(samples, seq_len=12, pad_id=0, packing=False), tmp_path)
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
                expected.extend(slot)
        assert rank_stream(len(data), start, steps, global_batch, 7, True, micro, rank,
                           accum) == expected


@pytest.mark.ray
def test_configure_gives_each_rank_its_scheduled_blocks_in_order(ray_local, tmp_path):
    import numpy as np

    from elastic_ft.data.shards import SHARD, ScheduledShards

    data = _prepared(tmp_path)

    class Controller:
        def __init__(self, schedule):
            self.schedule = schedule

        def data_schedule(self):
            return self.schedule

    # an uneven split: rank 0 trains 3 blocks per micro-step, rank 1 one
    world, micro, accum, global_batch, steps = 2, (3, 1), 2, 8, 7
    start = DataPosition(epoch=1, consumed=8)
    schedule = {"position": start.to_dict(), "steps": steps, "world_size": world,
                "micro_batches": list(micro), "grad_accum": accum, "global_batch": global_batch,
                "seed": 5, "shuffle": True}
    controller = ray_local.remote(Controller).remote(schedule)
    blocks = ray_local.data.from_arrow(data.table)
    iterators = ScheduledShards(controller).configure({SHARD: blocks}, world, None, None)
    assert len(iterators) == world
    delivered: list[int] = []
    for rank in range(world):
        got = list(iterators[rank][SHARD].iter_batches(batch_size=micro[rank],
                                                       batch_format="numpy"))
        expected = _schedule_slots(data, start, steps, global_batch, rank, micro, accum)
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

    # a schedule for another world size is refused, naming both
    with pytest.raises(RuntimeError, match="no data schedule for a group of 3"):
        ScheduledShards(controller).configure({SHARD: blocks}, 3, None, None)


def _schedule_slots(data: PreparedData, position: DataPosition, steps: int, global_batch: int,
                    rank: int, micro: tuple[int, ...], accum: int) -> list[list[int]]:
    out = []
    for _ in range(steps):
        indices, position = data.global_batch(position, global_batch, seed=5, shuffle=True)
        out.extend(rank_slots(indices, micro, rank, accum))
    return out


@pytest.mark.ray
def test_a_long_run_is_few_tasks_each_yielding_in_order(ray_local, tmp_path):
    """100 steps into 2 items: each gather task yields its 50 steps 16 at a time, in order."""
    from elastic_ft.data.shards import rank_dataset

    data = _prepared(tmp_path)
    world, micro, accum, global_batch, steps = 2, (1, 1), 2, 4, 100
    start = DataPosition(epoch=0, consumed=3)
    schedule = {"position": start.to_dict(), "steps": steps, "world_size": world,
                "micro_batches": list(micro), "grad_accum": accum, "global_batch": global_batch,
                "seed": 5, "shuffle": True}
    blocks = ray_local.data.from_arrow(data.table)
    for rank in range(world):
        ds = rank_dataset(blocks.to_arrow_refs(), len(data), schedule, rank, max_items=2)
        got = [b["slot"].tolist()
               for b in ds.iterator().iter_batches(batch_size=1, batch_format="numpy")]
        assert got == _schedule_slots(data, start, steps, global_batch, rank, micro, accum)
