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
from ray.train import DataConfig

from elastic_ft.data.prepared import DataPosition, gather_blocks, rank_stream

SHARD = "train"
STEPS_PER_BLOCK = 16  # one output block of a gather task: this many steps of one rank
MAX_ITEMS = 16  # gather tasks per rank and group start, at most


class ScheduledShards(DataConfig):
    def __init__(self, controller: Any) -> None:
        super().__init__(datasets_to_split="all")  # configured once per group, by rank 0's call
        self.controller = controller

    def configure(self, datasets: dict[str, Any], world_size: int, worker_handles: Any,
                  worker_node_ids: Any, **kwargs: Any) -> list[dict[str, Any]]:
        import ray
        from ray.util.debug import log_once

        # Ray Data warns once that a job "will hang" while no CPU is free (the training
        # workers hold them): not so here, nothing below reserves a CPU
        log_once("cpu_warning")
        schedule = ray.get(self.controller.data_schedule.remote())
        if schedule is None or schedule["world_size"] != world_size:
            raise RuntimeError(f"elastic_ft: no data schedule for a group of {world_size} "
                               f"workers (controller has {schedule})")
        blocks = datasets[SHARD]
        refs = blocks.to_arrow_refs()  # a materialised dataset: its blocks, not a copy
        n_blocks = blocks.count()
        return [{SHARD: rank_dataset(refs, n_blocks, schedule, rank).iterator()}
                for rank in range(world_size)]


def rank_dataset(refs: list[Any], n_blocks: int, schedule: dict[str, Any], rank: int,
                 max_items: int = MAX_ITEMS) -> Any:
    import ray

    slots = rank_stream(n_blocks, DataPosition(**schedule["position"]), schedule["steps"],
                        schedule["global_batch"], schedule["seed"], schedule["shuffle"],
                        schedule["micro_batches"], rank, schedule["grad_accum"])
    per_step = schedule["micro_batches"][rank] * schedule["grad_accum"]
    # At most MAX_ITEMS items, whatever the run's length (a 100k-step run made 6250 blocks
    # here and took 16 s per group start); each task yields STEPS_PER_BLOCK steps at a time.
    per_item = per_step * max(STEPS_PER_BLOCK, -(-schedule["steps"] // max_items))
    chunks = [{"slots": np.asarray(slots[i:i + per_item], dtype=np.int64)}
              for i in range(0, len(slots), per_item)] or [
                  {"slots": np.zeros(0, dtype=np.int64)}]
    # from_items builds its blocks here; from_numpy would run a task per block, which waits
    # forever for a CPU once the training workers hold them all (this runs at group start)
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        gather_blocks, batch_format="numpy", batch_size=1,
        fn_kwargs={"refs": refs, "rows_per_output": STEPS_PER_BLOCK * per_step},
        # a copy of blocks the node already holds: no CPU reservation, for the same reason
        num_cpus=0, compute=ray.data.TaskPoolStrategy(size=min(2, len(chunks))))
    ds.context.execution_options.preserve_order = True  # the schedule's order, not arrival's
    return ds


class ShardReader:
    """This rank's micro-batches, in order, from its shard of the schedule."""

    def __init__(self, shard: Any, micro_batch: int, prefetch_batches: int) -> None:
        self._batches = iter(shard.iter_batches(batch_size=micro_batch, batch_format="numpy",
                                                prefetch_batches=prefetch_batches))

    def next(self) -> dict[str, np.ndarray]:
        batch = next(self._batches, None)
        if batch is None:
            raise RuntimeError("elastic_ft: the data shard ended before the schedule did")
        return batch

