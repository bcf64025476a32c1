"""The driver's view of a running fine-tune: the controller's files, followed as they grow.

The controller actor (on the driver's node) appends every step to `metrics.jsonl`, every
decision to `events.jsonl` and the generated samples to `samples.jsonl`. `RunFollower` reads
what is new every `interval_s` and hands it, in order, to the console (bar and decision lines)
and to the trackers: one writer per run, once per step, whatever the world size.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from elastic_ft.report.console import Console


def describe(event: dict[str, Any]) -> str | None:
    """The one terminal line of a decision or milestone; None for bookkeeping events."""
    name, step = event["event"], event.get("step")
    at = f" at step {step}" if step is not None else ""
    lines = {
        "resize": lambda: f"resize: {event.get('from')} -> {event.get('to')} workers",
        "node_join": lambda: f"node joined: {str(event.get('node_id', ''))[:12]}",
        "node_lost": lambda: f"node lost: {str(event.get('node_id', ''))[:12]}",
        "node_draining": lambda: f"node draining: {str(event.get('node_id', ''))[:12]}",
        "preemption_notice": lambda: f"preemption notice ({event.get('source', '?')})",
        "jit_checkpoint": lambda: f"just-in-time checkpoint{at} ({event.get('reason')}, "
                                  f"{event.get('seconds', 0):.2f} s)",
        "jit_checkpoint_missed": lambda: "restart before the just-in-time checkpoint: steps "
                                         "since the last checkpoint are redone",
        "checkpoint": lambda: f"checkpoint{at} ({event.get('seconds', 0):.2f} s)",
        "resume": lambda: f"resumed{at} at world size {event.get('world_size')} (from "
                          f"{event.get('from_world_size')})",
        "rebalance": lambda: f"rebalance{at}: {event.get('reason')}",
        "replan_memory": lambda: f"memory re-plan{at}: {event.get('reason')}",
        "oom": lambda: f"out of memory on rank {event.get('rank')}{at} ({event.get('phase')})",
        "eval": lambda: f"eval{at}: loss {event['eval_loss']:.4f} perplexity "
                        f"{event['perplexity']:.2f}" + (" (best)" if event.get("best") else ""),
        "checkpoint_invalid": lambda: f"skipped an invalid checkpoint: {event.get('error')}",
        "warning": lambda: f"warning: {event.get('message', event)}",
        "run_failed": lambda: f"failed: {event.get('message')}",
    }
    return lines[name]() if name in lines else None


class _Tail:
    """New complete lines of a JSONL file (a line still being written waits)."""

    def __init__(self, path: Path, from_end: bool) -> None:
        self.path = path
        self.offset = path.stat().st_size if from_end and path.exists() else 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


class RunFollower:
    def __init__(self, out: Path, console: Console, trackers: list[Any], total_steps: int,
                 interval_s: float = 0.5) -> None:
        self.console, self.trackers, self.total = console, trackers, total_steps
        self.interval_s = interval_s
        # only this run's lines: a re-run appends to the same files
        self.metrics = _Tail(out / "metrics.jsonl", from_end=True)
        self.events = _Tail(out / "events.jsonl", from_end=True)
        self.samples = _Tail(out / "samples.jsonl", from_end=True)
        self.step, self.eval_loss = 0, None
        self.first: tuple[float, int] | None = None  # (time, step) of the first step seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="run-follower")

    def start(self) -> RunFollower:
        self.console.start(self.total)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()
        self.console.close()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as error:  # a tracker's hiccup must not stop training
                self.console.line(f"[elastic_ft] tracker error: {error!r}")

    def poll(self) -> None:
        records = [("metrics", r) for r in self.metrics.read()] + [
            ("event", r) for r in self.events.read()]
        records.sort(key=lambda item: item[1].get("t", 0))
        for kind, record in records:
            if kind == "event":
                self._event(record)
            elif "loss" in record:  # eval rows reach the trackers as the eval event
                self._metrics(record)
        samples = self.samples.read()
        for step in sorted({s["step"] for s in samples}):
            for tracker in self.trackers:
                tracker.log_samples(step, [s for s in samples if s["step"] == step])

    def _metrics(self, m: dict[str, Any]) -> None:
        step = int(m["step"])
        self.step = step
        if self.first is None:
            self.first = (m["t"], step)
        t0, step0 = self.first
        eta = ((self.total - step) * (m["t"] - t0) / (step - step0) if step > step0 else None)
        self.console.progress(step, m["loss"], self.eval_loss, m["tokens_per_s"],
                              m["world_size"], eta)
        values = {"train/loss": m["loss"], "train/lr": m["lr"],
                  "train/tokens_per_s": m["tokens_per_s"], "train/world_size": m["world_size"],
                  "train/epoch": m.get("epoch", 0), "memory/peak_mem_bytes": m["peak_mem_bytes"],
                  "memory/train_mem_bytes": m.get("train_mem_bytes", 0)}
        for tracker in self.trackers:
            tracker.log_metrics(step, values)

    def _event(self, event: dict[str, Any]) -> None:
        step = int(event.get("step") or self.step)
        if event["event"] == "eval":
            self.eval_loss = event["eval_loss"]
            for tracker in self.trackers:
                tracker.log_metrics(step, {"eval/loss": event["eval_loss"],
                                           "eval/perplexity": event["perplexity"]})
        if event["event"] == "plan":
            for tracker in self.trackers:
                tracker.log_metrics(step, {"plan/world_size": event["world_size"],
                                           "plan/grad_accum": event["grad_accum"],
                                           "plan/global_batch": event["global_batch"]})
        text = describe(event)
        if text is None:
            return
        self.console.line(f"[elastic_ft] {text}")
        for tracker in self.trackers:
            tracker.log_event(step, event["event"], text)
