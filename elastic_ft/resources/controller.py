"""`ElasticController`: one named actor holding the cluster picture and logging every decision.

It moves messages only; the decisions are pure (`policy.py`, `planning.py`) and the per-device
bookkeeping is `fleet.Fleet`. Workers call `plan()` on every (re)start with where each rank
runs, keep one `poll()` outstanding (it answers when a request is made, so a step costs no
call), send `metrics()` with every rank's peak memory and compute time of each step (rank 0
groups the steps of up to half a second in one call), and call `uploaded()` when a rank's
checkpoint is in storage.
A background thread watches nodes (joins, losses, drains) and keeps one `ResourceMonitor` on
each node, whose samples are the node inventory the plans are made from: a drain raises a
just-in-time checkpoint request; a join has Ray re-read the cluster at once, and Ray Train's
restart then waits in `checkpoint_before_restart` for the checkpoint (restart_gate.py); a
rank near its memory budget, or much slower than the others, gets a new per-worker plan.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from elastic_ft.events import EventLog, read_events
from elastic_ft.report.summary import eval_scores
from elastic_ft.resources.cluster_watch import ClusterWatch
from elastic_ft.resources.fleet import Fleet
from elastic_ft.resources.inventory import RankPlace
from elastic_ft.resources.recovery import RecoveryMarks
from elastic_ft.resources.warm_pool import SpareKeeper

CONTROLLER_NAME = "elastic_ft_controller"
NAMESPACE = "elastic_ft"


class ElasticController(ClusterWatch, SpareKeeper, RecoveryMarks):
    def __init__(self, output_dir: str, fleet: Fleet,
                 min_workers: int, max_workers: int, resources_per_worker: dict[str, float],
                 monitor_interval_s: float = 1.0, max_rebalances: int = 8,
                 jit_on_resize: bool = True, start_monitors: bool = True,
                 restart_wait_s: float = 45.0, preemption_urls: list[str] | None = None,
                 preemption_poll_s: float = 2.0, checkpoint_storage: str | None = None,
                 keep_checkpoints: int | None = None, keep_best: bool = False) -> None:
        self.out = Path(output_dir)
        self.events = EventLog(self.out / "events.jsonl")
        self.metrics_path = self.out / "metrics.jsonl"
        self.fleet = fleet
        self.rebalances_left = max_rebalances
        self.replan_t: float | None = None  # when the newest re-plan restart was asked for
        self.min_workers, self.max_workers = min_workers, max_workers
        self.resources_per_worker = resources_per_worker
        self.monitor_interval_s = monitor_interval_s
        self.jit_on_resize = jit_on_resize
        self.restart_wait_s = restart_wait_s
        # after a resize checkpoint, hold further requests while Ray Train restarts the group
        self.resize_hold_until = 0.0
        self.last_checkpoint_s: float | None = None
        self.preemption_urls = list(preemption_urls or [])
        self.preemption_poll_s = preemption_poll_s
        self.noticed: dict[str, int] = {}  # node -> deadline (ms) from a cloud notice
        self.checkpoint_storage = checkpoint_storage
        self.keep_checkpoints = keep_checkpoints
        self.keep_best = keep_best
        # eval loss by step, a re-run's earlier ones included (events.jsonl outlives us)
        self.eval_losses: dict[int, float] = eval_scores(read_events(self.events.path))
        self._pruning = threading.Lock()
        # checkpoint path -> digest of its manifests, for checkpoints hashed in full already
        # (core/checkpoint.py::verify_checkpoint): each is read for its checksums once
        self.hashed: dict[str, str] = {}
        self.world_size: int | None = None
        self.current_plan: dict[str, Any] | None = None
        self.pending: dict[str, Any] | None = None
        self.uploads: dict[int, set[int]] = {}  # step -> ranks whose part is in storage
        self.saved_step = -1  # newest checkpoint complete in storage
        self.trained_step: int | None = None  # newest step of the current group
        self.jit_done = threading.Event()
        self.refreshed_for: tuple[int, int] | None = None
        self.nodes: set[str] = set()
        self.joined: set[str] = set()  # nodes that joined after the start: node_join pending
        self.draining: dict[str, int] = {}  # node -> deadline (ms): Ray's drains and notices
        self.ray_draining: set[str] = set()  # the nodes Ray reported draining at the last look
        self.monitors: dict[str, Any] = {}
        # timeline marks: Ray Train's (RecoveryClock), a node seen alive, the newest rank's
        self.clock_marks: list[tuple[str, float]] = []
        self.previous_first_step_t: float | None = None
        self.warm_ranks = 0  # ranks of the current group that started in a warm spare
        self._lock = threading.Lock()
        self._requested = threading.Condition(self._lock)  # notified when `pending` is set
        self._stop = threading.Event()
        if start_monitors:
            self._watch_nodes(initial=True)
            threading.Thread(target=self._watch_loop, daemon=True).start()

    # -- called by workers -------------------------------------------------------------
    def plan(self, places: list[dict[str, Any]]) -> dict[str, Any]:
        """A new group's per-worker plan, from each rank's own device (`places`: what each
        rank reported of where it runs, in rank order)."""
        rank_places = [RankPlace.from_dict(p) for p in places]
        world_size = len(rank_places)
        with self._lock:
            previous = self.world_size
            # a request the old group never answered: steps lost only if it trained any
            # past the newest complete checkpoint
            trained = self.trained_step
            missed = self.pending if trained is not None and trained > self.saved_step else None
            plan, capped = self.fleet.new_group(rank_places)
            self.world_size = world_size
            self.worker_nodes = {p.node_id for p in rank_places}
            self.pending = None
            self.resize_hold_until = 0.0
            self.trained_step = None
            self.refreshed_for = None
            self.uploads.clear()  # an old group's partial uploads must not count for this one
            self.current_plan = dict(plan.to_dict(),
                                     ranks=[d.to_dict() for d in self.fleet.ranks])
        scheduled = [t for name, t in self.clock_marks if name == "new_group_scheduling"]
        self.warm_ranks = self._claim_spares(places, max(scheduled) if scheduled else None)
        self.mark_places(places)
        for event in capped:
            self.events.emit(event.pop("event"), **event)
        if missed is not None and missed.get("kind") not in ("memory", "rebalance"):
            # Ray Train restarted the group before the workers took the requested checkpoint
            # (it can see a joining node first): the steps since the last checkpoint are lost
            self.events.emit("jit_checkpoint_missed", **missed)
        if previous is not None and previous != world_size:
            self.events.emit("resize", **{"from": previous, "to": world_size})
        self.events.emit("plan", **self.current_plan)
        return self.current_plan

    def poll(self, wait_s: float = 0.0) -> dict[str, Any] | None:
        """A pending request for the workers (checkpoint now, and whether a restart follows),
        at once when there is one, else the first made within `wait_s` (None after it)."""
        with self._requested:
            self._requested.wait_for(lambda: self.pending is not None, timeout=wait_s)
            return self.pending

    def uploaded(self, step: int, rank: int, world_size: int, jit_kind: str | None,
                 started_s: float) -> None:
        """One rank's part of a checkpoint is in storage; complete once every rank's is."""
        with self._lock:
            ranks = self.uploads.setdefault(step, set())
            ranks.add(rank)
            if len(ranks) < world_size:
                return
            del self.uploads[step]
            self.saved_step = max(self.saved_step, step)
            if jit_kind is None:
                return
            self.pending = None
            if jit_kind in ("resize", "drain", "preemption"):
                self.resize_hold_until = time.time() + self.restart_wait_s
            self.jit_done.set()
        self.events.emit("jit_checkpoint", step=step, reason=jit_kind,
                         seconds=round(time.time() - started_s, 3))

    def checkpoint_before_restart(self, to_workers: int, timeout_s: float) -> dict[str, Any]:
        """Called from Ray Train's controller once it has decided to resize the live group:
        returns when the workers' just-in-time checkpoint is in storage (or after timeout_s),
        and Ray Train then shuts the group down. Nothing to wait for when the group has
        trained no step since the newest complete checkpoint (still loading, or done)."""
        with self._lock:
            trained, saved, world = self.trained_step, self.saved_step, self.world_size
            if not self.jit_on_resize or world is None or trained is None or trained <= saved:
                return {"checkpoint": False, "trained_step": trained, "saved_step": saved}
            self.jit_done.clear()
            if self.pending is None:
                self._request({"kind": "resize", "restart": True,
                               "reason": f"Ray Train resizes the group {world} -> {to_workers}"})
            pending = dict(self.pending)
        self.events.emit("jit_checkpoint_requested", kind=pending["kind"],
                         reason=pending["reason"])
        t0 = time.time()
        done = self.jit_done.wait(timeout_s)
        if not done:
            self.events.emit("jit_checkpoint_timeout", timeout_s=timeout_s, **pending)
        return {"checkpoint": done, "waited_s": round(time.time() - t0, 3)}

    def record(self, event: str, fields: dict[str, Any]) -> None:
        if event == "checkpoint":
            self.last_checkpoint_s = float(fields.get("seconds", 0.0))
            # what a hard node loss would resume from now: how far uploads lag the saves
            with self._lock:
                newest = self.saved_step if self.saved_step >= 0 else None
            fields = dict(fields, newest_complete_step=newest)
            if self.checkpoint_storage and self.keep_checkpoints:
                # hashing what is kept takes time: off the workers' path, one prune at a time
                threading.Thread(target=self._prune, daemon=True).start()
        if event == "end":  # no resize requests for a run that is over
            self.world_size = None
        self.events.emit(event, **fields)

    def metrics(self, *records: dict[str, Any]) -> None:
        """Step records in step order (rank 0 sends those of up to half a second together)."""
        with open(self.metrics_path, "a") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        for record in records:
            self._observe(record)

    def _observe(self, record: dict[str, Any]) -> None:
        self.trained_step = int(record["step"])
        with self._lock:
            if self.pending is not None:  # one request at a time; the group restarts anyway
                return
            if self.replan_t is not None:  # the first step after a re-plan's restart
                self.fleet.restart_s = time.time() - self.replan_t
                self.replan_t = None
            replan = self.fleet.observe(record.get("rank_mem_bytes"),
                                        record.get("rank_forward_s"),
                                        rebalance_allowed=self.rebalances_left > 0,
                                        step=self.trained_step, step_s=record.get("step_s"))
            if replan is None:
                return
            self.rebalances_left -= replan.kind == "rebalance"
            self._request({"kind": replan.kind, "restart": True, "reason": replan.reason})
            self.replan_t = time.time()
        name = "replan_memory" if replan.kind == "memory" else "rebalance"
        self.events.emit(name, step=self.trained_step, reason=replan.reason, **replan.event)

    def evals_done(self) -> list[int]:
        return sorted(self.eval_losses)

    def hashed_checkpoints(self) -> dict[str, str]:
        return dict(self.hashed)

    def checkpoints_hashed(self, hashed: dict[str, str]) -> None:
        """Rank 0 hashed these at a group start (one the prune had not reached yet)."""
        self.hashed.update(hashed)

    def evaluated(self, result: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        """Rank 0, after an eval all ranks ran: the figure, and the generated samples."""
        self.eval_losses[int(result["step"])] = float(result["eval_loss"])
        best = min(self.eval_losses.values())
        self.events.emit("eval", best=result["eval_loss"] <= best, **result)
        with open(self.metrics_path, "a") as f:  # beside the steps: no "loss" key
            f.write(json.dumps(dict(result, t=round(time.time(), 3))) + "\n")
        if samples:
            with open(self.out / "samples.jsonl", "a") as f:
                f.writelines(json.dumps(s) + "\n" for s in samples)

    def oom(self, rank: int, micro_batch: int, step: int, phase: str) -> bool:
        """An OOM that happened anyway, in any phase of a step: that rank's device gets half
        the micro-batch from now on, and the group restarts from the newest checkpoint.
        False when the rank was already at 1 (nothing left to re-plan: a real failure)."""
        self.events.emit("oom", rank=rank, micro_batch=micro_batch, step=step, phase=phase)
        if micro_batch <= 1:
            return False
        with self._lock:
            cap = self.fleet.lower_cap(rank, micro_batch // 2)
        self.events.emit("replan_memory", rank=rank, max_micro_batch=cap, step=step,
                         reason=f"out of memory in {phase}")
        return True

    def _prune(self) -> None:
        from elastic_ft.core.checkpoint import prune_checkpoints, run_storage

        with self._pruning:
            try:
                fs, run_dir = run_storage(str(self.checkpoint_storage))
                deleted = prune_checkpoints(run_dir, int(self.keep_checkpoints or 0), fs,
                                            self.eval_losses if self.keep_best else None,
                                            self.hashed)
            except Exception as error:  # storage briefly unreachable: the next prune retries
                self.events.emit("prune_error", error=repr(error))
                return
        if deleted:
            self.events.emit("checkpoints_pruned", deleted=[d.rsplit("/", 1)[-1]
                                                            for d in deleted])

    def shutdown(self) -> None:
        self._stop.set()
        self._forget_spares_of_run()
        for actor in self.monitors.values():
            try:
                actor.stop.remote()
            except Exception:
                pass

    def ping(self) -> float:
        return time.time()
