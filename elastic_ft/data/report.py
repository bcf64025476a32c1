"""Data quality report: `data_report.json` and its terminal table."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from elastic_ft.data.pack import Block, packing_efficiency


class DataQualityError(RuntimeError):
    """The data cannot train: nothing survived, or too much was rejected."""


def _percentile(values: list[int], q: float) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


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


def build_report(rows: list[dict[str, Any]], blocks: list[Block], seq_len: int,
                 formats: dict[str, str]) -> DataReport:
    reasons = Counter(r["reason"] for r in rows if r["reason"])
    kept_rows = [r for r in rows if not r["reason"]]
    lengths = [r["n_tokens"] for r in rows if r["n_tokens"]]
    by_source: dict[str, dict[str, int]] = {}
    for r in rows:
        entry = by_source.setdefault(r["source"], {"rows": 0, "kept": 0})
        entry["rows"] += 1
        entry["kept"] += 0 if r["reason"] else 1
    real = sum(b.real_tokens for b in blocks)
    assert len(kept_rows) + sum(reasons.values()) == len(rows)  # nothing silently lost
    return DataReport(
        rows=len(rows),
        kept=len(kept_rows),
        rejected=sum(reasons.values()),
        rejected_by_reason=dict(sorted(reasons.items())),
        formats=formats,
        token_length={"p50": _percentile(lengths, 0.5), "p95": _percentile(lengths, 0.95),
                      "max": max(lengths, default=0)},
        truncation_rate=sum(1 for r in kept_rows if r["truncated"]) / max(1, len(kept_rows)),
        duplicate_rate=reasons.get("duplicate", 0) / max(1, len(rows)),
        packing_efficiency=packing_efficiency(blocks, seq_len),
        blocks=len(blocks),
        real_tokens=real,
        trainable_tokens=sum(1 for b in blocks for x in b.labels if x != -100),
        padding_tokens=len(blocks) * seq_len - real,
        by_source=by_source,
    )
