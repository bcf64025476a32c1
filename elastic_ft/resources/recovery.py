"""A restart's timeline: from the change that caused it to the first step at the new size.

Marks come from three places and are put together here, as one `recovery` event per group:
- the controller's own events: the change (a node joined, lost or drained, a cloud notice, an
  OOM or a re-plan) and the just-in-time checkpoint (requested, in storage);
- Ray Train's controller (`recovery_clock.RecoveryClock`, a callback in `RunConfig(callbacks=...)`): when it
  decided to resize or restart, when the old worker group stopped, when the new one started;
- rank 0 of the new group: its process start, imports, the plan, the checkpoint chosen and
  verified, the data stream opened, the model loaded, the engine built, the checkpoint loaded
  (and converted), the first step done; and every rank's place: the newest process's start
  and, for a warm spare, its imports (at a join, the long pole);
- the controller's watcher: a new node seen alive (a join's start: `node_join` waits for the
  node's monitor).
`recovery_timeline` is pure: tested over hand-made marks without Ray. `RecoveryMarks` is the
controller's side. This module imports no Ray, so the controller actor, which uses it, starts
without Ray Train's imports.
"""

from __future__ import annotations

from typing import Any

from elastic_ft.events import read_events

# events that start a recovery, and the kind of change each one is
CHANGES = {"node_join": "join", "node_lost": "node_lost", "node_draining": "drain",
           "preemption_notice": "notice", "replan_memory": "memory", "rebalance": "rebalance",
           "oom": "oom"}
# the controller's own events that are phases of a recovery
# Ray Train's decisions on a running group, as the change they answer: it resizes a live group
# only to grow it (a join), and preempts for a drain; a restart is a failure it detected
RAY_TRAIN_CHANGES = {"resizing": "join", "preempting": "drain", "restarting": "restarting"}
# the controller's watcher saw a new node alive: node_join itself waits for the node's monitor
# to start and send its first sample, seconds later on a busy node
NODE_ALIVE = "node_alive"
EVENT_MARKS = {"jit_checkpoint_requested": "checkpoint_requested",
               "jit_checkpoint": "checkpoint_in_storage", "plan": "planned_by_controller"}


def recovery_timeline(trigger: dict[str, Any], marks: list[tuple[str, float]],
                      first_step_t: float) -> dict[str, Any]:
    """Phases in time order from the trigger to the first step; each phase's seconds are from
    the mark before it (a phase is named by the mark that ends it)."""
    t0 = float(trigger["t"])
    ordered = sorted(((name, t) for name, t in marks if t0 <= t <= first_step_t),
                     key=lambda m: m[1])
    ordered.append(("first_step", first_step_t))
    phases, previous = [], t0
    for name, t in ordered:
        phases.append({"phase": name, "t": round(t, 3), "s": round(t - previous, 3)})
        previous = t
    return {"trigger": trigger["kind"], "trigger_t": round(t0, 3),
            "total_s": round(first_step_t - t0, 3), "phases": phases}


def trigger_of(events: list[dict[str, Any]], since_t: float,
               clock: list[tuple[str, float]]) -> dict[str, Any]:
    """The first change after `since_t` (the previous group's first step): one our controller
    logged, or a decision of Ray Train's (a worker failure it detected before our watcher saw
    the node go), whichever came first."""
    seen = [(e["t"], CHANGES[e["event"]]) for e in events
            if e["t"] > since_t and e["event"] in CHANGES]
    for name, t in clock:
        if t > since_t and name.startswith("ray_train:"):
            state = name.split(":", 1)[1]
            seen.append((t, RAY_TRAIN_CHANGES.get(state, state)))
        elif t > since_t and name == NODE_ALIVE:
            seen.append((t, "join"))
    if not seen:
        return {"kind": "restart", "t": since_t}
    t, kind = min(seen)
    return {"kind": kind, "t": t}


def last_rank_marks(places: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """When the group's newest worker process started and, if it warmed itself as a spare,
    when its imports started and were done: at a join, the new node's spare is the restart's
    long pole."""
    started = [p for p in places if p.get("process_started_t") is not None]
    if not started:
        return []
    last = max(started, key=lambda p: p["process_started_t"])
    warm_started_t, warmed_t = last.get("warm_times") or (None, None)
    marks = [("last_rank_process_started", float(last["process_started_t"]))]
    if warm_started_t is not None and warmed_t is not None:
        marks += [("last_rank_warm_started", float(warm_started_t)),
                  ("last_rank_warmed", float(warmed_t))]
    return marks


class RecoveryMarks:
    """The controller's side (a mixin of `ElasticController`): it gathers the marks and emits
    one `recovery` event per group, at its first step."""

    events: Any
    clock_marks: list[tuple[str, float]]
    previous_first_step_t: float | None
    warm_ranks: int
    _top_up_spares_soon: Any  # warm_pool.SpareKeeper's

    def clock(self, name: str, t: float) -> None:
        """From Ray Train's controller: a decision or a worker group change, timestamped."""
        self.clock_marks.append((name, t))

    def mark_places(self, places: list[dict[str, Any]]) -> None:
        """A new group's ranks: kept in its timeline if they came after the change."""
        self.clock_marks += last_rank_marks(places)

    def group_ready(self, worker_marks: dict[str, float], first_step_t: float,
                    world_size: int, step: int) -> None:
        """Rank 0 after its group's first step: the `recovery` event, from the change that
        caused this group (or the run's start) to that step."""
        events = read_events(self.events.path)
        since = self.previous_first_step_t
        if since is None:
            starts = [e["t"] for e in events if e["event"] == "run_start"]
            trigger = {"kind": "start", "t": starts[-1] if starts else first_step_t}
        else:
            trigger = trigger_of(events, since, self.clock_marks)
        marks = [(EVENT_MARKS[e["event"]], e["t"]) for e in events
                 if e["event"] in EVENT_MARKS and e["t"] > (since or 0)]
        marks += [m for m in self.clock_marks if m[1] > (since or 0)]
        marks += list(worker_marks.items())
        timeline = recovery_timeline(trigger, marks, first_step_t)
        self.events.emit("recovery", world_size=world_size, step=step,
                         warm_ranks=self.warm_ranks, **timeline)
        self.previous_first_step_t = first_step_t
        self._top_up_spares_soon()  # for the next restart, now that this one is done
        self.clock_marks = [m for m in self.clock_marks if m[1] > first_step_t]
