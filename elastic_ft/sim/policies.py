"""Replay a spot trace under one policy: when the job trains, at what size, what it pays.

A pure discrete-event simulation (no Ray). Between node events the group trains at
`step_time(world)` per step, with a periodic checkpoint every `checkpoint_every_steps` steps
costing `checkpoint_s`. The policies, as the issue compares them:

- `elastic_ft`: trains on what is there between workers.min and workers.max; a notice on a
  worker's node takes a just-in-time checkpoint and restarts without it (no step lost); a hard
  loss goes back to the last checkpoint; a node that joins grows the group (just-in-time
  checkpoint first). Recovery seconds as this project measured them for each kind.
- `restart`: Ray Train's default at a fixed size (workers.max): notices unused; a lost worker
  loses the steps since the last periodic checkpoint; the nodes it holds wait, paid, for the
  full size to come back, then a plain restart.
- `wait`: the same fixed size, but as a managed spot job does it: on a loss every node is
  released (nothing paid while waiting) and the job relaunches once the full size is there.
- `on_demand`: the fixed size on on-demand nodes, never interrupted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import takewhile

from elastic_ft.sim.calibration import Calibration
from elastic_ft.sim.traces import NodeEvent, Trace

POLICIES = ("elastic_ft", "restart", "wait", "on_demand")


@dataclass(frozen=True)
class Job:
    steps: int
    min_workers: int
    max_workers: int
    checkpoint_every_steps: int
    tokens_per_step: int = 0


@dataclass
class PolicyResult:
    policy: str
    finished: bool
    completion_s: float | None  # None: not finished within the trace
    steps_done: int
    cost: float | None  # None: unpriced
    paid_node_h: float
    productive_node_h: float
    lost_node_h: float
    goodput: float
    lost_steps: int
    restarts: int
    timeline: list[tuple[float, int, int]] = field(default_factory=list)  # (t, alive, world)

    def to_dict(self) -> dict:
        """The figures; the timeline goes to the plot (compare.py), not the table."""
        out = asdict(self)
        out.pop("timeline")
        return out


class _Run:
    def __init__(self, policy: str, job: Job, cal: Calibration):
        self.policy, self.job, self.cal = policy, job, cal
        self.fixed = job.max_workers
        self.t = 0.0
        self.alive: list[str] = []
        self.noticed: set[str] = set()
        self.held: list[str] = []
        self.group: list[str] = []
        self.resume_at = 0.0
        self.step = 0.0  # steps done, fractional inside a step
        self.saved = 0  # steps in the newest checkpoint
        self.pending_node_s = 0.0  # node-seconds of steps not yet in a checkpoint
        self.paid_node_s = self.productive_node_s = self.lost_node_s = 0.0
        self.lost_steps = self.restarts = 0
        self.started = False
        self.draining: tuple[int, float] | None = None  # (old world size, until)
        self.finished_at: float | None = None
        self.timeline: list[tuple[float, int, int]] = [(0.0, 0, 0)]

    # time passing
    def advance(self, until: float) -> None:
        if self.finished_at is not None or until <= self.t:
            return
        self.paid_node_s += len(self.held) * (until - self.t)
        t = self.t
        if self.draining is not None:  # the old group trains on until it stops
            world, end = self.draining
            t = self._train(t, min(until, end), world)
            if end <= until and self.finished_at is None:
                self._checkpoint_now()
                self.draining = None
        if self.group and self.finished_at is None:
            self._train(max(t, self.resume_at), until, len(self.group))
        if self.finished_at is not None:  # not paid past the end
            self.paid_node_s -= len(self.held) * (until - self.finished_at)
        self.t = until

    def _train(self, t: float, until: float, world: int) -> float:
        """Steps from t to until at this world size; returns where training stopped."""
        per_step = self.cal.step_time(world)
        every = self.job.checkpoint_every_steps
        while t < until:
            whole = int(self.step + 1e-9)
            if whole >= self.job.steps:
                self.finished_at = t
                self._commit()
                return t
            left = (whole + 1 - self.step) * per_step
            if t + left > until:
                self.step += (until - t) / per_step
                return until
            t += left
            self.step = whole + 1
            self.pending_node_s += per_step * world
            if self.step % every == 0 and self.step < self.job.steps:
                self._commit()
                t += self.cal.checkpoint_s
                if t > until:  # the checkpoint runs on past this interval
                    self.resume_at = max(self.resume_at, t)
                    return until
        return t

    def _commit(self) -> None:
        self.saved = int(self.step + 1e-9)
        self.productive_node_s += self.pending_node_s
        self.pending_node_s = 0.0

    def _lose(self) -> None:
        self.lost_steps += int(self.step + 1e-9) - self.saved
        self.lost_node_s += self.pending_node_s
        self.pending_node_s = 0.0
        self.step = float(self.saved)

    def _start(self, nodes: list[str], kind: str) -> None:
        during = self.cal.train_during_s.get(kind, 0.0)
        if self.group and during > 0 and self.t >= self.resume_at:
            # a join or a notice: the old group trains on until the restart takes it
            self.draining = (len(self.group), self.t + during)
        self.group = list(nodes)
        self.resume_at = self.t + self.cal.recovery_s["start" if not self.started else kind]
        if self.started:
            self.restarts += 1
        self.started = True
    # the trace: every change at one instant first, then one decision
    def apply(self, batch: list[NodeEvent]) -> None:
        kind = None
        for event in batch:
            in_group = event.node in self.group
            if event.kind == "add":
                self.alive.append(event.node)
            elif event.kind == "notice":
                self.noticed.add(event.node)
                if in_group and self.policy == "elastic_ft" and kind is None:
                    kind = "notice"
            else:
                self.alive.remove(event.node)
                self.noticed.discard(event.node)
                if event.node in self.held:
                    self.held.remove(event.node)
                if in_group:
                    self._lose()
                    self.group = []
                    kind = "hard_loss"
                    if self.policy == "wait":
                        self.held = []  # a managed spot job lets every node go
        self._decide(kind)
        self.timeline.append((self.t, len(self.alive), len(self.group)))

    def _decide(self, kind: str | None) -> None:
        if self.policy == "elastic_ft":
            self._decide_elastic(kind)
            return
        if self.policy == "restart":
            self.held = self.alive[: self.fixed]  # kept, and paid, while it waits
        if not self.group and len(self.alive) >= self.fixed:
            self.held = self.alive[: self.fixed]
            self._start(self.held, "restart")

    def _decide_elastic(self, kind: str | None) -> None:
        self.held = [n for n in self.held if n in self.alive]
        for n in self.alive:
            if len([h for h in self.held if h not in self.noticed]) >= self.job.max_workers:
                break
            if n not in self.held and n not in self.noticed:
                self.held.append(n)
        target = [n for n in self.held if n not in self.noticed][: self.job.max_workers]
        if len(target) < self.job.min_workers:
            if kind == "notice":  # the checkpoint is taken; the group waits for capacity
                self._checkpoint_now()
            self.group = []
            return
        if self.group and kind is None and len(target) <= len(self.group):
            return
        if self.group:  # a notice or a join: a just-in-time checkpoint, nothing lost
            self._checkpoint_now()
            kind = kind or "join"
        self._start(target, kind or ("hard_loss" if self.started else "start"))

    def _checkpoint_now(self) -> None:
        self.step = float(int(self.step + 1e-9))  # at the step boundary
        self._commit()


def simulate(policy: str, trace: Trace, job: Job, cal: Calibration,
             price_per_h: float | None) -> PolicyResult:
    """One policy over one trace. `on_demand` ignores the trace: its nodes are always there."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; one of {POLICIES}")
    run = _Run(policy, job, cal)
    events = list(trace.events)
    end_s = float("inf") if trace.open_ended else trace.end_s
    if policy == "on_demand":
        events = [NodeEvent(0.0, "add", f"od{i}") for i in range(job.max_workers)]
        end_s = float("inf")
    i = 0
    while i < len(events) and events[i].t_s <= end_s:
        batch = list(takewhile(lambda e, t=events[i].t_s: e.t_s == t, events[i:]))
        i += len(batch)
        run.advance(batch[0].t_s)
        if run.finished_at is not None:
            break
        run.apply(batch)
    if run.finished_at is None:  # after the last event the nodes stay as they are
        horizon = end_s if end_s != float("inf") else run.t + _bound(job, cal)
        run.advance(max(horizon, run.t))
    done = int(run.step + 1e-9) if run.finished_at is None else job.steps
    end = run.finished_at if run.finished_at is not None else run.t
    run.timeline.append((end, len(run.alive), len(run.group)))
    return PolicyResult(
        policy, run.finished_at is not None, run.finished_at, done,
        None if price_per_h is None else run.paid_node_s / 3600 * price_per_h,
        run.paid_node_s / 3600, run.productive_node_s / 3600, run.lost_node_s / 3600,
        run.productive_node_s / run.paid_node_s if run.paid_node_s else 0.0,
        run.lost_steps, run.restarts, run.timeline)


def _bound(job: Job, cal: Calibration) -> float:
    """Long enough for the job at its smallest size, with a checkpoint at every interval."""
    per = cal.step_time(job.min_workers) + cal.checkpoint_s / job.checkpoint_every_steps
    return job.steps * per * 2 + max(cal.recovery_s.values()) * 4
