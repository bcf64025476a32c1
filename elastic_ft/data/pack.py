"""Pack tokenised samples into fixed-length blocks that never attend across samples.

Every block has `input_ids`, `labels` and `position_ids` of length `seq_len`. Positions restart
at 0 for each sample; with no attention mask, transformers turns those restarts into a
block-diagonal causal mask (`find_packed_sequence_indices`), so samples are isolated. Padding
is its own segment with labels -100.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from elastic_ft.data.tokenize import IGNORE_INDEX


@dataclass
class Block:
    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    sample_ids: list[str] = field(default_factory=list)
    real_tokens: int = 0

    def add(self, sample_id: str, ids: list[int], labels: list[int]) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(labels)
        self.position_ids.extend(range(len(ids)))
        self.sample_ids.append(sample_id)
        self.real_tokens += len(ids)

    def pad_to(self, seq_len: int, pad_id: int) -> None:
        missing = seq_len - len(self.input_ids)
        self.input_ids.extend([pad_id] * missing)
        self.labels.extend([IGNORE_INDEX] * missing)
        self.position_ids.extend(range(missing))


def pack_samples(samples: list[tuple[str, list[int], list[int]]], seq_len: int, pad_id: int,
                 packing: bool) -> list[Block]:
    """Greedy in-order packing; each sample (already <= seq_len) lands in exactly one block."""
    blocks: list[Block] = []
    current = Block()
    for sample_id, ids, labels in samples:
        if len(ids) > seq_len:
            raise ValueError(f"sample {sample_id} has {len(ids)} tokens > seq_len {seq_len}")
        if current.sample_ids and (not packing or len(current.input_ids) + len(ids) > seq_len):
            current.pad_to(seq_len, pad_id)
            blocks.append(current)
            current = Block()
        current.add(sample_id, ids, labels)
    if current.sample_ids:
        current.pad_to(seq_len, pad_id)
        blocks.append(current)
    return blocks


def packing_efficiency(blocks: list[Block], seq_len: int) -> float:
    return sum(b.real_tokens for b in blocks) / max(1, len(blocks) * seq_len)
