"""The workers' data: the prepared blocks in Ray's object store, read along the
world-size-independent schedule.

The trainer puts the prepared table in the object store as blocks of about `BLOCK_BYTES`
(`store_blocks`) and hands the workers their refs in the training function's config. Each
rank of a (re)started group reads exactly its micro-batches from the checkpoint's data
position to the end of the run (`prepared.rank_micro_batches`): every rank computes the same
schedule from the checkpoint's state and the controller's plan, so no rank waits for another
and nobody has to say afterwards which samples a lost group trained (Ray Data's
`streaming_split` hands blocks to whichever rank asks first). The worker checks every
micro-batch against the schedule.

A rank reads its rows straight from the object store, the blocks fetched ahead by a background
thread (`ShardReader`), holding only the blocks its next micro-batches need. Two earlier versions, measured on 2 cores
(benchmarks/elastic_recovery.py): a Ray Data pipeline per rank and group start (4-6 s after a
drain or a loss, 9-12 s after a join, mostly its executor and tasks starting), then the same
blocks through Ray Train's `datasets=` and a `DataConfig` (1.7-2.8 s per group start: Ray
Train starts a `DatasetManager` actor, a new process that imports Ray Data, for every group).
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from elastic_ft.data.prepared import PAD_SLOT, DataPosition, rank_micro_batches, take_blocks

BLOCK_BYTES = 64 * 1024**2  # the prepared table's blocks in the object store, about this size
CACHED_BLOCKS = 8  # blocks a rank keeps fetched (at least one micro-batch's worth)


@dataclass(frozen=True)
class StoredBlocks:
    """The prepared table in the object store: each block's ref, in order, and each block's
    first row (plus the row count at the end). The driver owns the blocks for the run."""

    refs: list[Any]
    first_rows: list[int]


def store_blocks(table: Any, block_bytes: int = BLOCK_BYTES) -> StoredBlocks:
    """Put the prepared table in the object store as blocks of about `block_bytes` (Ray
    stores only a slice's own rows)."""
    import ray

    parts = split_for_store(table, block_bytes)
    first_rows = np.cumsum([0] + [len(p) for p in parts]).tolist()
    return StoredBlocks([ray.put(p) for p in parts], first_rows)


def split_for_store(table: Any, block_bytes: int = BLOCK_BYTES) -> list[Any]:
    """The prepared table as slices of about `block_bytes` (zero-copy), one block each: a rank
    fetches only the blocks its micro-batches are in."""
    rows = max(1, block_bytes * max(1, len(table)) // max(1, table.nbytes))
    return [table.slice(i, rows) for i in range(0, len(table), rows)] or [table]


@dataclass(frozen=True)
class RankFeed:
    """What one rank of a group reads: the blocks' refs, each block's first row, the group's
    schedule and the rank. Small: the schedule is computed where it is read."""

    refs: list[Any]
    first_rows: list[int]
    schedule: dict[str, Any]
    rank: int

    def micro_batch_slots(self) -> Iterator[list[int]]:
        s = self.schedule
        return rank_micro_batches(self.first_rows[-1], DataPosition(**s["position"]),
                                  s["steps"], s["global_batch"], s["seed"], s["shuffle"],
                                  s["micro_batches"], self.rank, s["grad_accum"])


@dataclass(frozen=True)
class FetchedRows:
    """One micro-batch's slots and the fetched blocks (with their first rows) they are in."""

    slots: np.ndarray
    blocks: list[int]  # each real slot's block
    tables: dict[int, tuple[Any, int]]

    def arrays(self) -> dict[str, np.ndarray]:
        import pyarrow as pa

        is_real = self.slots != PAD_SLOT
        rows = [self.tables[b][0].slice(int(i) - self.tables[b][1], 1)
                for i, b in zip(self.slots[is_real], self.blocks, strict=True)]
        table = pa.concat_tables(rows) if rows else next(iter(self.tables.values()))[0]
        local = np.full(len(self.slots), PAD_SLOT, dtype=np.int64)
        local[is_real] = np.arange(len(rows))
        return {"slot": self.slots, **take_blocks(table, local)}


class BlockCache:
    """Rows by slot from the object store's blocks, the `max_blocks` last used kept fetched."""

    def __init__(self, refs: list[Any], first_rows: list[int],
                 max_blocks: int = CACHED_BLOCKS) -> None:
        self.refs, self.first_rows, self.max_blocks = refs, np.asarray(first_rows), max_blocks
        self._tables: OrderedDict[int, Any] = OrderedDict()

    def take(self, slots: list[int]) -> dict[str, np.ndarray]:
        return self.fetch(slots).arrays()

    def fetch(self, slots: list[int]) -> FetchedRows:
        """The blocks these slots are in, fetched from the object store (the part that waits)."""
        ids = np.asarray(slots, dtype=np.int64)
        real = ids[ids != PAD_SLOT]
        blocks = (np.searchsorted(self.first_rows, real, side="right") - 1).tolist()
        tables = self._fetch(sorted(set(blocks)) or [0])
        return FetchedRows(ids, blocks, {b: (t, int(self.first_rows[b]))
                                         for b, t in tables.items()})

    def _fetch(self, blocks: list[int]) -> dict[int, Any]:
        import ray

        missing = [b for b in blocks if b not in self._tables]
        for b, table in zip(missing, ray.get([self.refs[b] for b in missing]), strict=True):
            self._tables[b] = table
        for b in blocks:
            self._tables.move_to_end(b)
        while len(self._tables) > max(self.max_blocks, len(blocks)):
            self._tables.popitem(last=False)
        return {b: self._tables[b] for b in blocks}


_END = object()


class ShardReader:
    """This rank's micro-batches, in order. A background thread fetches their blocks ahead from
    the moment the feed arrives (the blocks come while the model loads); the rows are cut on
    the training thread as it asks. A thread cutting them too did that Python work beside the
    forward and backward: on the tiny model (2 ranks, 2 cores, 28 ms steps) those took 1.5 ms
    a step longer than in the plain loop, which cuts the same rows inline (py-spy of both).
    """

    def __init__(self, feed: RankFeed, prefetch_batches: int) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, prefetch_batches))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(feed,), daemon=True,
                                        name="elastic-ft-shard")
        self._thread.start()

    def _read(self, feed: RankFeed) -> None:
        try:
            cache = BlockCache(feed.refs, feed.first_rows)
            for slots in feed.micro_batch_slots():
                self._put(cache.fetch(slots))
                if self._stop.is_set():
                    return
            self._put(_END)
        except Exception as exc:  # surfaced by next(), on the training thread
            self._put(exc)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def next(self) -> dict[str, np.ndarray]:
        item = self._queue.get()
        if item is _END:
            raise RuntimeError("elastic_ft: the data shard ended before the schedule did")
        try:
            if isinstance(item, Exception):
                raise item
            return item.arrays()
        except Exception as error:
            raise RuntimeError(f"elastic_ft: reading this rank's data failed: {error}") from error

    def close(self) -> None:
        self._stop.set()
