"""Spot availability as a list of node events: `(t_s, add | remove | notice, node)`.

Two inputs:
- SkyPilot's spot traces (`{"metadata": {"gap_seconds": G}, "data": [n0, n1, ...]}`: how many
  instances were available at each tick; Wu et al., "Can't Be Late", NSDI 2024): a rise adds
  nodes, a fall removes nodes chosen at random (seeded: a count says nothing of which), each
  after a notice `notice_s` earlier (AWS gives 2 minutes);
- a JSONL or CSV list of `t, kind, node` rows, kept as written (a `remove` with no `notice`
  before it is a hard loss).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

KINDS = ("add", "remove", "notice")


@dataclass(frozen=True)
class NodeEvent:
    t_s: float
    kind: str  # add | remove | notice
    node: str


@dataclass(frozen=True)
class Trace:
    name: str
    events: tuple[NodeEvent, ...]
    end_s: float  # a count trace says nothing after this
    open_ended: bool = False  # an event list: the nodes stay as they are after its last row

    def available(self) -> list[tuple[float, int]]:
        """(t, nodes alive) after each add or remove, from 0."""
        alive, out = set(), [(0.0, 0)]
        for e in self.events:
            if e.kind == "add":
                alive.add(e.node)
            elif e.kind == "remove":
                alive.discard(e.node)
            else:
                continue
            out.append((e.t_s, len(alive)))
        return out


def from_counts(counts: list[int], gap_s: float, name: str, notice_s: float = 120.0,
                seed: int = 0, start_tick: int = 0, cap: int | None = None) -> Trace:
    """A count trace as node events; `cap`: the most nodes requested (counts above it unused)."""
    rng = random.Random(seed)
    alive: list[str] = []
    events: list[NodeEvent] = []
    made = 0
    ticks = counts[start_tick:]
    for i, count in enumerate(ticks):
        t = i * gap_s
        count = min(count, cap) if cap is not None else count
        while len(alive) < count:
            alive.append(f"n{made}")
            made += 1
            events.append(NodeEvent(t, "add", alive[-1]))
        while len(alive) > count:
            node = alive.pop(rng.randrange(len(alive)))
            if notice_s > 0:
                events.append(NodeEvent(max(0.0, t - notice_s), "notice", node))
            events.append(NodeEvent(t, "remove", node))
    events.sort(key=lambda e: (e.t_s, KINDS.index(e.kind)))
    return Trace(name, tuple(events), len(ticks) * gap_s)


def load_trace(path: str | Path, notice_s: float = 120.0, seed: int = 0, start_tick: int = 0,
               cap: int | None = None) -> Trace:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace {path} not found: give a SkyPilot spot trace (.json) "
                                f"or a list of t,kind,node rows (.jsonl / .csv)")
    if path.suffix == ".json":
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict) or "data" not in raw:
            raise ValueError(f"{path}: not a SkyPilot spot trace (no 'data' list of counts)")
        gap_s = float((raw.get("metadata") or {}).get("gap_seconds") or 0)
        if gap_s <= 0:
            raise ValueError(f"{path}: metadata.gap_seconds missing; the trace needs its tick")
        return from_counts([int(x) for x in raw["data"]], gap_s, path.stem, notice_s, seed,
                           start_tick, cap)
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".csv":
        rows = list(csv.DictReader(path.read_text().splitlines()))
    else:
        raise ValueError(f"{path}: a trace is .json (SkyPilot counts), .jsonl or .csv events")
    events = []
    for i, row in enumerate(rows, 1):
        kind = str(row.get("kind", "")).strip()
        if kind not in KINDS or "t" not in row or not row.get("node"):
            raise ValueError(f"{path} row {i}: needs t, kind (one of {KINDS}) and node")
        events.append(NodeEvent(float(row["t"]), kind, str(row["node"])))
    events.sort(key=lambda e: (e.t_s, KINDS.index(e.kind)))
    end_s = events[-1].t_s if events else 0.0
    return Trace(path.stem, tuple(events), end_s, open_ended=True)
