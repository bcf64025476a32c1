"""What the simulator knows about the job, each figure with where it came from.

Step time per world size (the global batch stays constant, so more workers make shorter
steps), recovery seconds per kind of change, and the checkpoint cost come from this project's
own measurements: `bench scaling` results, a run's `metrics.jsonl` and `events.jsonl`,
`benchmarks/elastic_recovery.py` results. A world size never measured is scaled linearly from
the nearest one measured, and says so.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elastic_ft.events import read_events, read_steps

RECOVERY_KINDS = ("start", "join", "notice", "hard_loss", "restart")


@dataclass(frozen=True)
class Calibration:
    step_s: dict[int, float]  # world size -> seconds per step
    recovery_s: dict[str, float]  # RECOVERY_KINDS -> seconds to the first step at the new size
    checkpoint_s: float  # one periodic checkpoint, training paused
    sources: dict[str, str] = field(default_factory=dict)
    # seconds the old group keeps training after a join or a notice, inside recovery_s
    train_during_s: dict[str, float] = field(default_factory=dict)

    def step_time(self, world: int) -> float:
        if world in self.step_s:
            return self.step_s[world]
        nearest = min(self.step_s, key=lambda w: (abs(w - world), -w))
        return self.step_s[nearest] * nearest / world

    def source_of_step(self, world: int) -> str:
        if world in self.step_s:
            return self.sources.get("step_s", "given")
        nearest = min(self.step_s, key=lambda w: (abs(w - world), -w))
        return f"scaled linearly from {nearest} worker(s)"

    def to_dict(self) -> dict[str, Any]:
        return {"step_s": {str(k): v for k, v in sorted(self.step_s.items())},
                "recovery_s": self.recovery_s, "checkpoint_s": self.checkpoint_s,
                "train_during_s": self.train_during_s, "sources": self.sources}


def step_s_from_scaling(path: str | Path) -> dict[int, float]:
    """`bench scaling` results: the strong-scaling rows (same global batch at every size)."""
    rows = json.loads(Path(path).read_text())["rows"]
    return {int(r["workers"]): float(r["median_step_s"]) for r in rows if r["mode"] == "strong"}


def step_s_from_metrics(run_dir: str | Path) -> dict[int, float]:
    """A run's median step time at each world size it trained at (its first step of each
    group, which opens the data stream, left out)."""
    by_world: dict[int, list[float]] = {}
    previous = None
    for m in read_steps(Path(run_dir) / "metrics.jsonl"):
        if previous is not None and m["step"] == previous["step"] + 1 and \
                m["world_size"] == previous["world_size"]:
            by_world.setdefault(int(m["world_size"]), []).append(float(m["step_s"]))
        previous = m
    return {w: statistics.median(v) for w, v in by_world.items()}


def checkpoint_s_from_run(run_dir: str | Path) -> float | None:
    seconds = [float(e["seconds"]) for e in read_events(Path(run_dir) / "events.jsonl")
               if e["event"] == "checkpoint" and e.get("mode") == "async"]
    return statistics.median(seconds) if seconds else None


def recovery_from_benchmark(path: str | Path) -> dict[str, float]:
    """`benchmarks/elastic_recovery.py` results: elastic_ft's drain, join and hard loss, and
    the plain Ray Train restart (its hard loss) for the restart policies."""
    summary = json.loads(Path(path).read_text())["summary"]
    pick = {"notice": "elastic_ft/drain_then_loss", "join": "elastic_ft/join",
            "hard_loss": "elastic_ft/hard_loss", "restart": "plain/hard_loss"}
    out = {k: float(summary[v]["median_recovery_s"]) for k, v in pick.items() if v in summary}
    if "join" in out:
        out.setdefault("start", out["join"])
    return out


# a `recovery` event's trigger -> the simulator's kind of change
_TRIGGERS = {"start": "start", "join": "join", "drain": "notice", "notice": "notice",
             "resizing": "join",
             "preempting": "notice", "node_lost": "hard_loss", "restarting": "hard_loss"}


def recovery_from_run(run_dir: str | Path) -> dict[str, float]:
    """A run's own `recovery` events (one per group start): median seconds from the change to
    the first step at the new size, per kind of change."""
    by_kind: dict[str, list[float]] = {}
    for e in read_events(Path(run_dir) / "events.jsonl"):
        if e["event"] == "recovery" and e.get("trigger") in _TRIGGERS:
            by_kind.setdefault(_TRIGGERS[e["trigger"]], []).append(float(e["total_s"]))
    return {k: statistics.median(v) for k, v in by_kind.items()}


def calibrate(scaling: str | Path | None = None, run_dir: str | Path | None = None,
              recovery: str | Path | None = None, tokens_per_s_per_node: float | None = None,
              tokens_per_step: int | None = None, checkpoint_s: float | None = None,
              overrides: dict[str, float] | None = None) -> Calibration:
    """Put the sources together; a missing figure is an error naming what would give it."""
    sources: dict[str, str] = {}
    step_s: dict[int, float] = {}
    if scaling:
        step_s, sources["step_s"] = step_s_from_scaling(scaling), f"bench scaling: {scaling}"
    elif run_dir:
        step_s = step_s_from_metrics(run_dir)
        sources["step_s"] = f"median step_s by world size: {run_dir}/metrics.jsonl"
    elif tokens_per_s_per_node and tokens_per_step:
        step_s = {1: tokens_per_step / tokens_per_s_per_node}
        sources["step_s"] = (f"{tokens_per_s_per_node:.0f} tokens/s per node (given), "
                             f"{tokens_per_step} tokens per step")
    if not step_s:
        raise ValueError("simulate: no step time: give --scaling (bench scaling results), "
                         "--run (a run's output_dir) or --tokens-per-s-per-node")
    rec: dict[str, float] = {}
    if recovery:
        rec = recovery_from_benchmark(recovery)
        sources["recovery_s"] = f"benchmarks/elastic_recovery.py results: {recovery}"
    if run_dir:  # what the run itself measured fills in the kinds not given
        for kind, seconds in recovery_from_run(run_dir).items():
            if kind not in rec:
                rec[kind] = seconds
                sources[f"recovery_s.{kind}"] = f"median recovery event: {run_dir}/events.jsonl"
    for key, value in (overrides or {}).items():
        rec[key] = float(value)
        sources[f"recovery_s.{key}"] = "given"
    missing = [k for k in RECOVERY_KINDS if k not in rec]
    if missing:
        raise ValueError(f"simulate: no recovery time for {missing}: give --recovery "
                         f"(elastic_recovery.json) or --recovery-s KIND=SECONDS")
    if checkpoint_s is None and run_dir:
        checkpoint_s = checkpoint_s_from_run(run_dir)
        sources["checkpoint_s"] = f"median periodic checkpoint: {run_dir}/events.jsonl"
    elif checkpoint_s is not None:
        sources["checkpoint_s"] = "given"
    if checkpoint_s is None:
        raise ValueError("simulate: no checkpoint time: give --run or --checkpoint-s")
    return Calibration(step_s, rec, float(checkpoint_s), sources)

