"""Pack tokenised samples into fixed-length blocks that never attend across samples.

Every block has `input_ids`, `labels` and `position_ids` of length `seq_len`. Positions restart
at 0 for each sample; with no attention mask, transformers turns those restarts into a
block-diagonal causal mask (`find_packed_sequence_indices`), so samples are isolated. Padding
is its own segment with labels -100.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elastic_ft.data.tokenize import IGNORE_INDEX, count_trainable


@dataclass
class Block:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    real_tokens: int = 0
    trainable_tokens: int = 0  # labels not IGNORE_INDEX: counted as samples are added

    def add(self, sample_id: str, ids: list[int], labels: list[int]) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(labels)
        self.position_ids.extend(range(len(ids)))
        self.sample_ids.append(sample_id)
        self.real_tokens += len(ids)
        self.trainable_tokens += count_trainable(labels)

    def pad_to(self, seq_len: int, pad_id: int) -> None:
        missing = seq_len - len(self.input_ids)
        self.input_ids.extend([pad_id] * missing)
        self.labels.extend([IGNORE_INDEX] * missing)
        self.position_ids.extend(range(missing))


class BlockPacker:
    """Greedy in-order packing, one sample at a time: `add` returns each block as it fills, so
    a stream of any length is packed holding one block."""

    def __init__(self, seq_len: int, pad_id: int, packing: bool) -> None:
        self.seq_len, self.pad_id, self.packing = seq_len, pad_id, packing
        self.current = Block()

    def add(self, sample_id: str, ids: list[int], labels: list[int]) -> Block | None:
        if len(ids) > self.seq_len:
            raise ValueError(f"sample {sample_id} has {len(ids)} tokens > seq_len {self.seq_len}")
        full = None
        if self.current.sample_ids and (
                not self.packing or len(self.current.input_ids) + len(ids) > self.seq_len):
            full = self.finish()
        self.current.add(sample_id, ids, labels)
        return full

    def finish(self) -> Block | None:
        """The block being filled, padded; None when it is empty."""
        block, self.current = self.current, Block()
        if not block.sample_ids:
            return None
        block.pad_to(self.seq_len, self.pad_id)
        return block


def pack_samples(samples: list[tuple[str, list[int], list[int]]], seq_len: int, pad_id: int,
                 packing: bool) -> list[Block]:
    """Greedy in-order packing; each sample (already <= seq_len) lands in exactly one block."""
    packer = BlockPacker(seq_len, pad_id, packing)
    blocks = [b for s in samples if (b := packer.add(*s)) is not None]
    last = packer.finish()
    return blocks + ([last] if last is not None else [])
