"""Pack tokenised samples into fixed-length blocks that never attend across samples.

Every block has `input_ids`, `labels` and `position_ids` of length `seq_len`. Positions restart
at 0 for each sample; with no attention mask, transformers turns those restarts into a
block-diagonal causal mask (`find_packed_sequence_indices`), so samples are isolated. Padding
is its own segment with labels -100.

Packing works on columns (numpy), a batch of samples at a time: the only Python loop is the
greedy choice of each sample's block (one step per sample); tokens are placed by one scatter
per batch, never one by one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from elastic_ft.data.tokenize import IGNORE_INDEX

BLOCK_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                          ("position_ids", pa.list_(pa.int32())),
                          ("sample_ids", pa.list_(pa.string())), ("n_trainable", pa.int32())])


def _offsets(lengths: Sequence[int] | np.ndarray) -> np.ndarray:
    """Where each sample starts in the flat token arrays, and where the last one ends."""
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


@dataclass
class Samples:
    """Tokenised samples as columns: sample k's tokens are `ids[offsets[k]:offsets[k+1]]`."""
    sample_ids: list[str]
    offsets: np.ndarray  # int64, len(sample_ids) + 1, starting at 0
    ids: np.ndarray  # int32, every sample's tokens one after the other
    labels: np.ndarray  # int32, aligned with ids

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_lists(cls, samples: Sequence[tuple[str, Sequence[int], Sequence[int]]]) -> Samples:
        lengths = [len(ids) for _, ids, _ in samples]
        return cls([s for s, _, _ in samples],
                   _offsets(lengths), np.fromiter((t for _, ids, _ in samples for t in ids), np.int32),
                   np.fromiter((t for _, _, labels in samples for t in labels), np.int32))

    @classmethod
    def from_arrow(cls, table: pa.Table) -> Samples:
        """From a table with `sample_id`, `input_ids` and `labels` (list<int32>) columns."""
        ids = table.column("input_ids").combine_chunks()
        labels = table.column("labels").combine_chunks()
        lengths = ids.value_lengths().to_numpy(zero_copy_only=False)
        return cls(table.column("sample_id").to_pylist(),
                   _offsets(lengths), ids.flatten().to_numpy().astype(np.int32, copy=False),
                   labels.flatten().to_numpy().astype(np.int32, copy=False))

    def take(self, start: int, stop: int) -> Samples:
        """Samples [start, stop) as their own columns."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return Samples(self.sample_ids[start:stop], self.offsets[start:stop + 1] - lo,
                       self.ids[lo:hi], self.labels[lo:hi])

    def where(self, mask: np.ndarray) -> Samples:
        """The samples where `mask` (one bool per sample) is true, in order."""
        tokens = np.repeat(mask, self.lengths)
        return Samples([s for s, keep in zip(self.sample_ids, mask.tolist(), strict=True)
                        if keep], _offsets(self.lengths[mask]), self.ids[tokens],
                       self.labels[tokens])

    @staticmethod
    def empty() -> Samples:
        return Samples([], np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32))

    @staticmethod
    def concat(parts: Sequence[Samples]) -> Samples:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Samples.empty()
        starts = np.cumsum([0] + [int(p.offsets[-1]) for p in parts[:-1]])
        return Samples([s for p in parts for s in p.sample_ids],
                       np.concatenate([[0]] + [p.offsets[1:] + b for p, b in zip(
                           parts, starts, strict=True)]).astype(np.int64),
                       np.concatenate([p.ids for p in parts]),
                       np.concatenate([p.labels for p in parts]))


@dataclass
class Blocks:
    """Whole packed blocks as columns: row i of each (n, seq_len) array is block i."""
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    sample_counts: np.ndarray  # how many samples each block holds
    sample_ids: list[str]  # every block's samples, block after block
    real_tokens: np.ndarray  # per block: tokens that are not padding
    trainable_tokens: np.ndarray  # per block: labels that are not IGNORE_INDEX

    def __len__(self) -> int:
        return len(self.input_ids)

    def record_batches(self, max_blocks: int) -> Iterator[pa.RecordBatch]:
        """The blocks as record batches of at most `max_blocks` (Arrow's list offsets are
        32-bit: a batch holds well under 2**31 tokens)."""
        seq_len = self.input_ids.shape[1]
        sample_ends = np.cumsum(self.sample_counts)
        for lo in range(0, len(self), max_blocks):
            hi = min(lo + max_blocks, len(self))
            first = int(sample_ends[lo - 1]) if lo else 0
            sample_offsets = np.concatenate([[first], sample_ends[lo:hi]]) - first

            def rows(array: np.ndarray, lo: int = lo, hi: int = hi) -> pa.ListArray:
                return pa.ListArray.from_arrays(
                    pa.array(np.arange(0, (hi - lo + 1) * seq_len, seq_len, dtype=np.int32)),
                    pa.array(array[lo:hi].reshape(-1).astype(np.int32, copy=False)))

            yield pa.record_batch([
                rows(self.input_ids), rows(self.labels), rows(self.position_ids),
                pa.ListArray.from_arrays(
                    pa.array(sample_offsets.astype(np.int32)),
                    pa.array(self.sample_ids[first:int(sample_ends[hi - 1])], pa.string())),
                pa.array(self.trainable_tokens[lo:hi].astype(np.int32))], schema=BLOCK_SCHEMA)


def _build_blocks(samples: Samples, block_of: np.ndarray, start: np.ndarray, n_blocks: int,
                  seq_len: int, pad_id: int) -> Blocks:
    """Place every sample's tokens at (its block, its start) in one scatter; the rest pads,
    its positions a segment of their own."""
    lengths = samples.lengths
    within = np.arange(len(samples.ids)) - np.repeat(samples.offsets[:-1], lengths)
    dest = np.repeat(block_of * seq_len + start, lengths) + within
    real_tokens = np.bincount(block_of, weights=lengths, minlength=n_blocks).astype(np.int64)
    input_ids = np.full(n_blocks * seq_len, pad_id, np.int32)
    labels = np.full(n_blocks * seq_len, IGNORE_INDEX, np.int32)
    position_ids = (np.arange(seq_len)[None, :] - real_tokens[:, None]).reshape(-1)
    input_ids[dest], labels[dest], position_ids[dest] = samples.ids, samples.labels, within
    trained = np.concatenate([[0], np.cumsum(samples.labels != IGNORE_INDEX)])
    per_sample = trained[samples.offsets[1:]] - trained[samples.offsets[:-1]]
    shape = (n_blocks, seq_len)
    return Blocks(input_ids.reshape(shape), labels.reshape(shape),
                  position_ids.astype(np.int32).reshape(shape),
                  np.bincount(block_of, minlength=n_blocks), samples.sample_ids, real_tokens,
                  np.bincount(block_of, weights=per_sample, minlength=n_blocks).astype(np.int64))


class BlockPacker:
    """Greedy in-order packing: `add` returns the blocks a batch of samples filled and keeps
    the samples of the block still filling, so a stream of any length is packed holding one
    batch and one block."""

    def __init__(self, seq_len: int, pad_id: int, packing: bool) -> None:
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing
        self.open = Samples.empty()  # the block being filled

    def add(self, batch: Samples) -> Blocks | None:
        samples = Samples.concat([self.open, batch])
        lengths = samples.lengths.tolist()
        block_of, start = [0] * len(lengths), [0] * len(lengths)
        block = fill = held = 0  # the block being filled, its tokens and its samples
        for k, length in enumerate(lengths):
            if length > self.seq_len:
                raise ValueError(f"sample {samples.sample_ids[k]} has {length} tokens > "
                                 f"seq_len {self.seq_len}")
            if held and (not self.packing or fill + length > self.seq_len):
                block, fill, held = block + 1, 0, 0
            block_of[k], start[k] = block, fill
            fill, held = fill + length, held + 1
        first_open = block_of.index(block) if lengths else 0
        self.open = samples.take(first_open, len(samples))
        if block == 0:
            return None
        return _build_blocks(samples.take(0, first_open), np.asarray(block_of[:first_open]),
                             np.asarray(start[:first_open]), block, self.seq_len, self.pad_id)

    def finish(self) -> Blocks | None:
        """The block being filled, padded; None when it is empty."""
        if not len(self.open):
            return None
        samples, self.open = self.open, Samples.empty()
        zero = np.zeros(len(samples), np.int64)
        return _build_blocks(samples, zero, samples.offsets[:-1], 1, self.seq_len, self.pad_id)


def pack_samples(samples: Samples, seq_len: int, pad_id: int, packing: bool) -> Blocks:
    """Greedy in-order packing; each sample (already <= seq_len) lands in exactly one block."""
    packer = BlockPacker(seq_len, pad_id, packing)
    parts = [b for b in (packer.add(samples), packer.finish()) if b is not None]
    return concat_blocks(parts, seq_len)


def concat_blocks(parts: Sequence[Blocks], seq_len: int) -> Blocks:
    if not parts:
        empty = np.zeros((0, seq_len), np.int32)
        return Blocks(empty, empty, empty, np.zeros(0, np.int64), [], np.zeros(0, np.int64),
                      np.zeros(0, np.int64))
    if len(parts) == 1:
        return parts[0]
    return Blocks(*(np.concatenate([getattr(p, name) for p in parts]) for name in (
        "input_ids", "labels", "position_ids", "sample_counts")),
        [s for p in parts for s in p.sample_ids],
        np.concatenate([p.real_tokens for p in parts]),
        np.concatenate([p.trainable_tokens for p in parts]))
