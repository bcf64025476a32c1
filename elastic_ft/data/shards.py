"""The workers' data: Ray Train's dataset sharding, cut along the world-size-independent schedule.

The trainer passes the prepared blocks as `datasets={"train": ...}` with `ScheduledShards` as
its `dataset_config`, and each worker reads `ray.train.get_dataset_shard("train")`. Ray Data's
default split (`streaming_split`) hands blocks to whichever rank asks first, so after a restart
nobody could say which samples the lost group had trained. Here each (re)started group gets
one ordered Ray Data stream per rank: exactly that rank's micro-batches from the checkpoint's
data position to the end of the run (`prepared.rank_stream`). The schedule decides which
blocks, Ray Data moves them, and the worker checks every micro-batch against the schedule.

Rank 0 hands the controller the group's schedule before the first `get_dataset_shard` call;
Ray Train runs `configure` when rank 0 makes that call (a barrier for the other ranks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
from ray.train import DataConfig

from elastic_ft.data.prepared import PAD_SLOT, DataPosition, rank_stream

SHARD = "train"
STEPS_PER_BLOCK = 16  # one gather task feeds this many steps of one rank
_TABLES: dict[str, pa.Table] = {}  # per process: the prepared blocks, fetched once


class ScheduledShards(DataConfig):
    def __init__(self, controller: Any) -> None:
        super().__init__(datasets_to_split="all")  # configured once per group, by rank 0's call
        self.controller = controller

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        import ray

        schedule = ray.get(self.controller.data_schedule.remote())
        if schedule is None or schedule["world_size"] != world_size:
            raise RuntimeError(f"elastic_ft: no data schedule for a group of {world_size} "
                               f"workers (controller has {schedule})")
        blocks = datasets[SHARD]
        refs = blocks.to_arrow_refs()  # a materialised dataset: its blocks, not a copy
        n_blocks = blocks.count()
        return [{SHARD: rank_dataset(refs, n_blocks, schedule, rank).iterator()}
                for rank in range(world_size)]


def rank_dataset(refs: list[Any], n_blocks: int, schedule: dict[str, Any], rank: int) -> Any:
    import ray

    slots = rank_stream(n_blocks, DataPosition(**schedule["position"]), schedule["steps"],
                        schedule["global_batch"], schedule["seed"], schedule["shuffle"],
                        schedule["world_size"], rank, schedule["micro_batch"],
                        schedule["grad_accum"])
    per_block = STEPS_PER_BLOCK * schedule["micro_batch"] * schedule["grad_accum"]
    chunks = [np.asarray(slots[i:i + per_block], dtype=np.int64)
              for i in range(0, len(slots), per_block)] or [np.zeros(0, dtype=np.int64)]
    ds = ray.data.from_numpy(chunks).map_batches(
        gather_blocks, batch_format="numpy", batch_size=None, fn_kwargs={"refs": refs},
        # a copy of blocks the node already holds: no CPU reservation, which on a small box
        # could starve it behind the training workers (Ray Data's 2-core deadlock)
        num_cpus=0, concurrency=min(2, len(chunks)))
    ds.context.execution_options.preserve_order = True  # the schedule's order, not arrival's
    return ds


def gather_blocks(batch: dict[str, np.ndarray], refs: list[Any]) -> dict[str, np.ndarray]:
    """The blocks at these slots, in order; PAD_SLOT gives an all-masked block."""
    import ray

    key = ",".join(r.hex() for r in refs)
    if key not in _TABLES:
        _TABLES.clear()
        _TABLES[key] = pa.concat_tables(ray.get(list(refs)))
    table = _TABLES[key]
    slots = batch["data"]
    real = slots != PAD_SLOT
    rows = table.take(pa.array(slots[real]))
    seq_len = len(table.column("input_ids")[0]) if len(table) else 0
    out = {"slot": slots,
           "input_ids": np.zeros((len(slots), seq_len), dtype=np.int64),
           "labels": np.full((len(slots), seq_len), -100, dtype=np.int64),
           "position_ids": np.tile(np.arange(seq_len, dtype=np.int64), (len(slots), 1))}
    for name in ("input_ids", "labels", "position_ids"):
        column = rows.column(name).combine_chunks()
        out[name][real] = column.flatten().to_numpy().reshape(len(rows), seq_len)
    return out
