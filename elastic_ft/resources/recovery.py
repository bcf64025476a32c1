"""A restart's timeline: from the change that caused it to the first step at the new size.

Marks come from three places and are put together here, as one `recovery` event per group:
- the controller's own events: the change (a node joined, lost or drained, a cloud notice, an
  OOM or a re-plan) and the just-in-time checkpoint (requested, in storage);
- Ray Train's controller (`recovery_clock.RecoveryClock`, a callback in `RunConfig(callbacks=...)`): when it
  decided to resize or restart, when the old worker group stopped, when the new one started;
- rank 0 of the new group: its process start, imports, the plan, the checkpoint chosen and
  verified, the data stream opened, the model loaded, the engine built, the checkpoint loaded
  (and converted), the first step done.
`recovery_timeline` is pure: tested over hand-made marks without Ray, and this module imports
no Ray, so the controller actor, which uses it, starts without Ray Train's imports.
"""

from __future__ import annotations

from typing import Any

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
