"""Prepared blocks on disk and the world-size-independent data schedule over them.

The data position is `(epoch, consumed)`: blocks of this epoch's order already trained. The next
global batch is always `order[consumed : consumed + global_batch]`, whatever the world size, and
each rank takes its own slots of it. So a resume at another world size continues the epoch with
no sample repeated or skipped, and the position is two integers in the checkpoint.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from elastic_ft.data.pack import BLOCK_SCHEMA, Blocks

BLOCKS_FILE = "blocks.arrow"
PAD_SLOT = -1  # fills a short last batch; an all-masked block that trains nothing


@dataclass(frozen=True)
class DataPosition:
    epoch: int = 0
    consumed: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class BlockWriter:
    """Blocks streamed to `OUT/blocks.arrow` in record batches of `batch_blocks`: the writer
    holds one batch, whatever the number of blocks. The file appears (renamed from .tmp) only
    when `close` completes."""

    def __init__(self, out_dir: Path, batch_blocks: int = 256) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir, self.batch_blocks = out_dir, batch_blocks
        self.tmp = out_dir / (BLOCKS_FILE + ".tmp")
        self.sink = pa.OSFile(str(self.tmp), "wb")
        self.writer = pa.ipc.new_file(self.sink, BLOCK_SCHEMA)
        self.pending: list[pa.RecordBatch] = []

    def add(self, blocks: Blocks) -> None:
        for batch in blocks.record_batches(self.batch_blocks):
            self.pending.append(batch)
            if sum(len(b) for b in self.pending) >= self.batch_blocks:
                self._flush(whole_only=True)

    def _flush(self, whole_only: bool = False) -> None:
        """Writes the pending blocks as record batches of `batch_blocks` (the last one shorter
        unless `whole_only`, which keeps it pending)."""
        table = pa.Table.from_batches(self.pending, BLOCK_SCHEMA)
        done = len(table) - len(table) % self.batch_blocks if whole_only else len(table)
        for start in range(0, done, self.batch_blocks):
            part = table.slice(start, min(self.batch_blocks, done - start)).combine_chunks()
            self.writer.write_batch(part.to_batches()[0])
        self.pending = table.slice(done).combine_chunks().to_batches() if done < len(
            table) else []

    def abort(self) -> None:
        self.writer.close()
        self.sink.close()
        self.tmp.unlink(missing_ok=True)

    def close(self) -> PreparedData:
        self._flush()
        self.writer.close()
        self.sink.close()
        self.tmp.replace(self.out_dir / BLOCKS_FILE)
        return PreparedData.open(self.out_dir)


def write_blocks(blocks: Blocks, out_dir: Path) -> PreparedData:
    writer = BlockWriter(out_dir)
    writer.add(blocks)
    return writer.close()


def epoch_order(n_blocks: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    order = list(range(n_blocks))
    if shuffle:
        random.Random(seed * 100_003 + epoch).shuffle(order)
    return order


def next_global_batch(order: list[int], position: DataPosition,
                      global_batch: int) -> tuple[list[int], DataPosition]:
    chosen = order[position.consumed: position.consumed + global_batch]
    consumed = position.consumed + len(chosen)
    after = DataPosition(position.epoch + 1, 0) if consumed >= len(order) else DataPosition(
        position.epoch, consumed)
    return chosen, after


def rank_micro_batches(n_blocks: int, position: DataPosition, steps: int, global_batch: int,
                       seed: int, shuffle: bool, micro_batches: Sequence[int], rank: int,
                       grad_accum: int) -> Iterator[list[int]]:
    """The block slots of each micro-batch this rank trains in the next `steps` steps, in
    order (PAD_SLOT where a batch runs short). Lazy: a 100k-step run's schedule is never built
    at once."""
    order, epoch = [], -1
    for _ in range(steps):
        if position.epoch != epoch:
            order, epoch = epoch_order(n_blocks, position.epoch, seed, shuffle), position.epoch
        chosen, position = next_global_batch(order, position, global_batch)
        yield from rank_slots(chosen, micro_batches, rank, grad_accum)


class PreparedData:
    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self._trainable = table.column("n_trainable").to_pylist()
        # a table of n_trainable and sample_ids only is the schedule's index of the blocks
        self.seq_len = (len(table.column("input_ids")[0])
                        if len(table) and "input_ids" in table.column_names else 0)
        self._order_cache: dict[tuple[int, int, bool], list[int]] = {}

    @classmethod
    def open(cls, prepared_dir: str | Path) -> PreparedData:
        source = pa.memory_map(str(Path(prepared_dir) / BLOCKS_FILE))
        return cls(pa.ipc.open_file(source).read_all())

    def __len__(self) -> int:
        return len(self.table)

    def epoch_order(self, epoch: int, seed: int, shuffle: bool) -> list[int]:
        """Seeded order of one epoch; built once per epoch, not on every step."""
        key = (epoch, seed, shuffle)
        if key not in self._order_cache:
            self._order_cache = {key: epoch_order(len(self), epoch, seed, shuffle)}
        return self._order_cache[key]

    def steps_per_epoch(self, global_batch: int) -> int:
        return -(-len(self) // global_batch)

    def global_batch(self, position: DataPosition, global_batch: int, seed: int,
                     shuffle: bool) -> tuple[list[int], DataPosition]:
        """Block indices of the next global batch, and the position after it."""
        return next_global_batch(self.epoch_order(position.epoch, seed, shuffle), position,
                                 global_batch)

    def trainable_tokens(self, indices: list[int]) -> int:
        return sum(self._trainable[i] for i in indices if i != PAD_SLOT)

    def sample_ids(self, indices: list[int]) -> list[str]:
        ids = self.table.column("sample_ids")
        return [s for i in indices if i != PAD_SLOT for s in ids[i].as_py()]

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """Tensors (b, seq_len) for these blocks; PAD_SLOT gives a fully masked block."""
        import torch

        arrays = take_blocks(self.table, np.asarray(indices, dtype=np.int64))
        return {name: torch.from_numpy(array) for name, array in arrays.items()}


def take_blocks(table: pa.Table, slots: np.ndarray) -> dict[str, np.ndarray]:
    """input_ids / labels / position_ids (len(slots), seq_len) of these blocks, in order;
    PAD_SLOT gives an all-masked block."""
    seq_len = len(table.column("input_ids")[0]) if len(table) else 0
    real = slots != PAD_SLOT
    rows = table.take(pa.array(slots[real]))
    out = {"input_ids": np.zeros((len(slots), seq_len), dtype=np.int64),
           "labels": np.full((len(slots), seq_len), -100, dtype=np.int64),
           "position_ids": np.tile(np.arange(seq_len, dtype=np.int64), (len(slots), 1))}
    for name, array in out.items():
        column = rows.column(name).combine_chunks()
        array[real] = column.flatten().to_numpy().reshape(len(rows), seq_len)
    return out


def rank_slots(global_indices: list[int], micro_batches: Sequence[int], rank: int,
               grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch. Micro-step j holds the slots
    [j*M, (j+1)*M) (M = sum of the ranks' micro-batches), rank r the `micro_batches[r]` of them
    after the lower ranks' share; a short batch is padded with PAD_SLOT. With alike ranks this
    is slot (j*W + r) of width m."""
    per_micro = sum(micro_batches)
    start = sum(micro_batches[:rank])
    width = micro_batches[rank]
    padded = list(global_indices) + [PAD_SLOT] * (per_micro * grad_accum - len(global_indices))
    return [padded[j * per_micro + start: j * per_micro + start + width]
            for j in range(grad_accum)]
