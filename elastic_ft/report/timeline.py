"""A run's wall clock cut into what each second went to, and which nodes were paid meanwhile.

Pure functions over `events.jsonl` and `metrics.jsonl` records (no Ray): the cost report
(cost.py) prices what they return. Each run session (`run_start` .. `run_end`, or a driver
that died and a re-run that resumed) is one window. Inside a window:

- a training step is `productive` when it counts, `lost` when a later row redoes its step
  (a restart from an older checkpoint), both from the workers' own `step_s`;
- `checkpoint` and `eval` are the seconds the workers measured (`checkpoint`/`eval` events);
- a gap with a new worker group starting in it is `recovery`, except where fewer nodes that
  can host a worker were alive than `workers.min` (`waiting` for capacity);
- before the first step `startup`, after the last `shutdown` (final save, export, teardown);
- what is left between two steps of one group is `other` (per-step reporting): it should be
  small, and the report shows it, so that a second counted twice or lost shows up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CATEGORIES = ("productive", "lost", "checkpoint", "eval", "recovery", "waiting", "startup",
              "shutdown", "other")


@dataclass
class NodeSpan:
    node_id: str
    accelerator: str | None
    devices: int
    node_group: str | None
    market_label: str | None
    joined_t: float
    left_t: float
    hosted_worker: bool = False


@dataclass
class Timeline:
    windows: list[tuple[float, float]]
    intervals: list[tuple[float, float, str]]  # tiling every window, adjacent ones merged
    nodes: list[NodeSpan]
    steps: int  # distinct steps trained
    lost_steps: int  # step rows redone later
    tokens: int  # trained tokens of the steps that count
    measured_s: dict[str, float] = field(default_factory=dict)  # raw sums, for reconciling
    running: bool = False


def _windows(events: list[dict[str, Any]], metrics: list[dict[str, Any]],
             now: float | None) -> tuple[list[tuple[float, float]], bool]:
    times = sorted([e["t"] for e in events] + [m["t"] for m in metrics])
    starts = [e["t"] for e in events if e["event"] == "run_start"]
    ends = sorted(e["t"] for e in events if e["event"] in ("run_end", "run_failed"))
    windows, running = [], False
    for i, start in enumerate(starts):
        nxt = starts[i + 1] if i + 1 < len(starts) else float("inf")
        end = next((t for t in ends if start <= t < nxt), None)
        if end is None:  # still running, or a driver that died before a re-run
            inside = [t for t in times if start <= t < nxt]
            if nxt == float("inf") and now is not None:
                end, running = now, True
            else:
                end = inside[-1] if inside else start
        windows.append((start, end))
    return windows, running


def _node_spans(events: list[dict[str, Any]],
                windows: list[tuple[float, float]]) -> list[NodeSpan]:
    spans: list[NodeSpan] = []
    hosts = {n for e in events if e["event"] == "start" for n in e.get("nodes") or []}
    for w0, w1 in windows:
        alive: dict[str, NodeSpan] = {}
        for e in events:
            if not w0 <= e["t"] <= w1:
                continue
            if e["event"] in ("inventory", "node_join"):
                # inventory: there when the run started; a join: came to be used
                rows = e["nodes"] if e["event"] == "inventory" else [e]
                for row in rows:
                    if row["node_id"] not in alive:
                        alive[row["node_id"]] = NodeSpan(
                            row["node_id"], row.get("accelerator"), int(row.get("gpus") or 0),
                            row.get("node_group"), row.get("market"),
                            w0 if e["event"] == "inventory" else e["t"], w1,
                            e["event"] == "node_join" or row["node_id"] in hosts)
            elif e["event"] == "node_lost" and e["node_id"] in alive:
                span = alive.pop(e["node_id"])
                span.left_t = e["t"]
                spans.append(span)
        spans.extend(alive.values())
    return spans


def _capacity_short(nodes: list[NodeSpan], t0: float, t1: float,
                    min_workers: int) -> list[tuple[float, float]]:
    """The parts of [t0, t1] when fewer worker-capable nodes than workers.min were alive."""
    cuts = sorted({t0, t1, *(n.joined_t for n in nodes if t0 < n.joined_t < t1),
                   *(n.left_t for n in nodes if t0 < n.left_t < t1)})
    short = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        mid = (a + b) / 2
        alive = sum(1 for n in nodes if n.hosted_worker and n.joined_t <= mid < n.left_t)
        if alive < min_workers:
            short.append((a, b))
    return short


def _fill(gap: tuple[float, float], label: str, marks: list[tuple[float, float, str]],
          out: list[tuple[float, float, str]]) -> None:
    """Cut the gap into the marked spans (checkpoint, eval, waiting) and `label` between."""
    cursor, end = gap
    for a, b, mark in sorted(marks):
        a, b = max(a, cursor), min(b, end)
        if b <= a:
            continue
        if a > cursor:
            out.append((cursor, a, label))
        out.append((a, b, mark))
        cursor = b
    if end > cursor:
        out.append((cursor, end, label))


def _work_after_rows(rows: list[dict[str, Any]], events: list[dict[str, Any]]
                     ) -> dict[int, list[tuple[float, str]]]:
    """Checkpoint and eval seconds after each step row. An event belongs to the newest row of
    its step trained before it: the controller logs it a moment after the worker's clock
    stopped, often after the next step began, so its own time cannot place it."""
    rows_of_step: dict[int, list[int]] = {}
    for i, m in enumerate(rows):
        rows_of_step.setdefault(int(m["step"]), []).append(i)
    out: dict[int, list[tuple[float, str]]] = {}
    for e in events:
        if e["event"] not in ("checkpoint", "eval") or "step" not in e:
            continue
        before = [i for i in rows_of_step.get(int(e["step"]), []) if rows[i]["t"] <= e["t"]]
        if before:
            i = max(before, key=lambda i: rows[i]["t"])
            out.setdefault(i, []).append((float(e.get("seconds") or 0), e["event"]))
    for work in out.values():  # the worker checkpoints, then evaluates
        work.sort(key=lambda x: x[1] != "checkpoint")
    return out


def _placed(start: float, work: list[tuple[float, str]]) -> list[tuple[float, float, str]]:
    marks = []
    for seconds, kind in work:
        marks.append((start, start + seconds, kind))
        start += seconds
    return marks


def build_timeline(events: list[dict[str, Any]], metrics: list[dict[str, Any]],
                   now: float | None = None) -> Timeline:
    """`now`: the time to close a run still in progress at (None: its last record)."""
    windows, running = _windows(events, metrics, now)
    nodes = _node_spans(events, windows)
    min_workers = next((int(e.get("min_workers") or 1) for e in reversed(events)
                        if e["event"] == "run_start"), 1)
    last_of_step: dict[int, float] = {}
    for m in metrics:
        last_of_step[m["step"]] = max(last_of_step.get(m["step"], m["t"]), m["t"])
    group_starts = [e["t"] for e in events if e["event"] in ("plan", "start")]
    intervals: list[tuple[float, float, str]] = []
    measured = dict.fromkeys(CATEGORIES, 0.0)
    for w0, w1 in windows:
        rows = sorted((m for m in metrics if w0 <= m["t"] <= w1),
                      key=lambda m: m["t"] - m["step_s"])
        after = _work_after_rows(rows, [e for e in events if w0 <= e["t"] <= w1])
        for work in after.values():
            for seconds, kind in work:
                measured[kind] += seconds
        cursor = w0
        for i, m in enumerate(rows):
            start = max(cursor, m["t"] - m["step_s"])
            if start > cursor:
                if i == 0:
                    label = "startup"
                elif any(cursor < t < m["t"] for t in group_starts):
                    label = "recovery"
                else:
                    label = "other"
                marks = _placed(cursor, after.get(i - 1, []))
                if label == "recovery":
                    marks += [(a, b, "waiting") for a, b in
                              _capacity_short(nodes, cursor, start, min_workers)]
                _fill((cursor, start), label, marks, intervals)
            kind = "productive" if last_of_step[m["step"]] == m["t"] else "lost"
            measured[kind] += m["step_s"]
            intervals.append((start, m["t"], kind))
            cursor = max(cursor, m["t"])
        if w1 > cursor:
            _fill((cursor, w1), "shutdown" if rows else "startup",
                  _placed(cursor, after.get(len(rows) - 1, [])), intervals)
    tokens = sum(int(m.get("trained_real_tokens") or 0) for m in metrics
                 if last_of_step[m["step"]] == m["t"])
    return Timeline(windows, _merged(intervals), nodes, len(last_of_step),
                    len(metrics) - len(last_of_step), tokens, measured, running)


def _merged(intervals: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    out: list[tuple[float, float, str]] = []
    for a, b, label in intervals:
        if out and out[-1][2] == label and abs(out[-1][1] - a) < 1e-9:
            out[-1] = (out[-1][0], b, label)
        else:
            out.append((a, b, label))
    return out


def seconds_by_category(timeline: Timeline) -> dict[str, float]:
    total = dict.fromkeys(CATEGORIES, 0.0)
    for a, b, label in timeline.intervals:
        total[label] += b - a
    return total
