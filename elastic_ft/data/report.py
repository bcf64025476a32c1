"""Data quality report: `data_report.json` and its terminal table."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from elastic_ft.data.pack import Blocks


class DataQualityError(RuntimeError):
    """The data cannot train: nothing survived, or too much was rejected."""


def _percentile(counts: Counter[int], q: float) -> int:
    """The q-quantile (nearest rank) of the values counted in `counts` (value -> how many)."""
    total = sum(counts.values())
    if not total:
        return 0
    rank = min(total - 1, int(round(q * (total - 1))))
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen > rank:
            return value
    return max(counts)


@dataclass
class DataReport:
    rows: int
    kept: int
    rejected: int
    rejected_by_reason: dict[str, int]
    formats: dict[str, str]
    token_length: dict[str, int]
    truncation_rate: float
    duplicate_rate: float
    packing_efficiency: float
    blocks: int
    real_tokens: int
    trainable_tokens: int
    padding_tokens: int
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)
    # the eval set: its source (holdout or paths) and counts; blocks above are training's
    eval: dict[str, Any] = field(default_factory=dict)

    @property
    def reject_rate(self) -> float:
        return self.rejected / max(1, self.rows)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> DataReport:
        return cls(**json.loads(Path(path).read_text()))

    def table(self) -> str:
        lines = [
            f"{'rows read':<22}{self.rows:>10}",
            f"{'kept':<22}{self.kept:>10}",
            f"{'rejected':<22}{self.rejected:>10}",
        ]
        lines += [f"  {reason:<20}{n:>10}" for reason, n in sorted(self.rejected_by_reason.items())]
        lines += [
            f"{'tokens p50/p95/max':<22}{self.token_length['p50']:>4}/{self.token_length['p95']}/"
            f"{self.token_length['max']}",
            f"{'truncation rate':<22}{self.truncation_rate:>10.2%}",
            f"{'duplicate rate':<22}{self.duplicate_rate:>10.2%}",
            f"{'packing efficiency':<22}{self.packing_efficiency:>10.2%}",
            f"{'blocks':<22}{self.blocks:>10}",
            f"{'trainable tokens':<22}{self.trainable_tokens:>10}",
        ]
        if self.eval:
            lines.append(f"{'eval (' + self.eval['source'] + ')':<22}"
                         f"{self.eval.get('samples', 0):>10} samples, "
                         f"{self.eval.get('blocks', 0)} blocks")
        return "\n".join(lines)


class ReportBuilder:
    """The report's figures, accumulated one row and one block at a time: its memory grows
    with the number of distinct token lengths and sources, not with the rows."""

    def __init__(self, seq_len: int) -> None:
        self.seq_len = seq_len
        self.rows = self.kept = self.truncated = 0
        self.reasons: Counter[str] = Counter()
        self.lengths: Counter[int] = Counter()
        self.by_source: dict[str, dict[str, int]] = {}
        self.blocks = self.real_tokens = self.trainable_tokens = 0

    def add_rows(self, sources: pa.ChunkedArray, reasons: list[str], n_tokens: np.ndarray,
                 truncated: np.ndarray) -> None:
        """A batch of rows: their sources, reasons ("" for kept), token counts, truncations."""
        self.rows += len(reasons)
        kept = np.array([not r for r in reasons], dtype=bool)
        # counted per source in Arrow: a batch has a few sources and many rows
        for key, values in (("rows", sources), ("kept", sources.filter(pa.array(kept)))):
            counts = pc.value_counts(values)
            for source, count in zip(counts.field("values").to_pylist(),
                                     counts.field("counts").to_pylist(), strict=True):
                entry = self.by_source.setdefault(source, {"rows": 0, "kept": 0})
                entry[key] += count
        lengths, counts = np.unique(n_tokens[n_tokens > 0], return_counts=True)
        self.lengths.update(dict(zip(lengths.tolist(), counts.tolist(), strict=True)))
        self.reasons.update(r for r in reasons if r)
        self.kept += int(kept.sum())
        self.truncated += int(truncated[kept].sum())

    def add_blocks(self, blocks: Blocks) -> None:
        self.blocks += len(blocks)
        self.real_tokens += int(blocks.real_tokens.sum())
        self.trainable_tokens += int(blocks.trainable_tokens.sum())

    def build(self, formats: dict[str, str]) -> DataReport:
        assert self.kept + sum(self.reasons.values()) == self.rows  # nothing silently lost
        return DataReport(
            rows=self.rows,
            kept=self.kept,
            rejected=sum(self.reasons.values()),
            rejected_by_reason=dict(sorted(self.reasons.items())),
            formats=formats,
            token_length={"p50": _percentile(self.lengths, 0.5),
                          "p95": _percentile(self.lengths, 0.95),
                          "max": max(self.lengths, default=0)},
            truncation_rate=self.truncated / max(1, self.kept),
            duplicate_rate=self.reasons.get("duplicate", 0) / max(1, self.rows),
            packing_efficiency=self.real_tokens / max(1, self.blocks * self.seq_len),
            blocks=self.blocks,
            real_tokens=self.real_tokens,
            trainable_tokens=self.trainable_tokens,
            padding_tokens=self.blocks * self.seq_len - self.real_tokens,
            by_source=self.by_source,
        )

