"""Recovery after node loss / join: elastic_ft against plain Ray Train V2 elastic, side by side.

On a fake-node cluster (head + 2 nodes of {CPU: 2, trainer: 1}, one worker per node), each
trial runs one job per system through the same three events, each SETTLE_S (30 s) after the
run trained its steps at the size before:
  1. drain: the node gets Ray's preemption drain notice, and is removed 5 s later (or as soon
     as elastic_ft's just-in-time checkpoint is done);
  2. join: the node comes back;
  3. hard loss: a node is removed with no warning.
For each event: seconds from the event to the first step trained at the new size, and steps
lost (trained before the event, trained again after). The plain baseline is what a Ray Train
user writes from the docs: same model, ZeRO-2 via DeepSpeed is replaced by DDP (its ZeRO
checkpoints do not load at another world size), a checkpoint every 10 steps, Ray's defaults.

The head declares a lost node dead as the shipped cluster configs do
(`elastic_ft/resources/node_health.py`: ~3 s for a killed raylet); `--health-check ray-defaults`
keeps Ray's defaults (15 s and more), the "before" of that setting.

    python benchmarks/elastic_recovery.py --trials 3 [--systems plain,elastic_ft,elastic_ft_cold]
        # elastic_ft_cold: elastic_ft with workers.warm_spares false
        [--health-check training|ray-defaults]
    python benchmarks/elastic_recovery.py --detection 3   # node death detection alone
    python benchmarks/elastic_recovery.py --trials 3 --systems elastic_ft --against ../old
        # each trial also runs elastic_ft from another checkout (a git worktree of an older
        # commit), alternating with this one: a before/after in one sitting
Writes benchmarks/results/<hardware>/elastic_recovery.json (with Ray's health-check defaults:
elastic_recovery_ray_health_defaults.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from elastic_ft.testing.fake_nodes import (  # noqa: E402
    WORKER_RESOURCES,
    FakeNodeCluster,
)

OUR_ENV = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
           "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S")
CHECKPOINT_EVERY = 10
RESIZE_INTERVAL_S = 2.0
# each event comes this long after the run trained its steps at the current size (spot
# notices come minutes apart): elastic_ft's warm spares for the next restart warm meanwhile,
# on these 2 cores beside the training (warm_pool.py)
SETTLE_S = 30.0


def plain_train_fn(config: dict[str, Any]) -> None:
    """A plain Ray Train loop: HF model + DDP, checkpoint every 10 steps, resume from it."""
    import ray.train
    import torch
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM

    model = ray.train.torch.prepare_model(
        AutoModelForCausalLM.from_pretrained(config["model"]), move_to_device=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inner = getattr(model, "module", model)  # DDP wraps only at world size > 1
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / "state.pt", weights_only=True)
        inner.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    generator = torch.Generator().manual_seed(0)
    while step < config["max_steps"]:
        ids = torch.randint(0, 1000, (8 // world, 128), generator=generator)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if rank == 0:
            with open(config["metrics"], "a") as f:
                f.write(json.dumps({"step": step, "world_size": world, "t": time.time()}) + "\n")
        if step % CHECKPOINT_EVERY == 0:
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    torch.save({"model": inner.state_dict(),
                                "optimizer": optimizer.state_dict(), "step": step},
                               Path(tmp) / "state.pt")
                ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(tmp)
                                 if rank == 0 else None)


class Job:
    """One training job in a side thread; its per-step metrics file."""

    def __init__(self, system: str, model: Path, out: Path, max_steps: int) -> None:
        import threading

        self.metrics_path = out / "metrics.jsonl"
        self.out = out
        self.error: BaseException | None = None
        out.mkdir(parents=True, exist_ok=True)
        if system == "plain":
            for name in OUR_ENV:
                os.environ.pop(name, None)
            target = self._plain(model, max_steps)
        else:  # elastic_ft_cold: the same without warm spares (the before of them)
            target = self._elastic_ft(model, max_steps, warm=system != "elastic_ft_cold")

        def run() -> None:
            try:
                target()
            except BaseException as error:  # the cluster is torn down under a finished trial
                self.error = error

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def _plain(self, model: Path, max_steps: int):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        trainer = TorchTrainer(
            plain_train_fn,
            train_loop_config={"model": str(model), "max_steps": max_steps,
                               "metrics": str(self.metrics_path)},
            scaling_config=ScalingConfig(num_workers=(1, 2), resources_per_worker=WORKER_RESOURCES,
                                         elastic_resize_monitor_interval_s=RESIZE_INTERVAL_S),
            run_config=RunConfig(name="plain", storage_path=str(self.out / "storage"),
                                 failure_config=FailureConfig(max_failures=5)))
        return trainer.fit

    def _elastic_ft(self, model: Path, max_steps: int, warm: bool):
        from elastic_ft.config import load_config
        from elastic_ft.core.trainer import run_training

        root = Path(__file__).resolve().parents[1]
        cfg = load_config(root / "configs" / "tiny-lora-cpu.yaml", {
            "model.name_or_path": str(model), "output_dir": str(self.out),
            "workers.min": 1, "workers.max": 2, "workers.resources_per_worker": WORKER_RESOURCES,
            "workers.resize_interval_s": RESIZE_INTERVAL_S, "workers.max_failures": 5,
            "workers.start_timeout_s": 10, "train.max_steps": max_steps,
            "checkpoint.every_steps": CHECKPOINT_EVERY, "elastic.monitor_interval_s": 0.5,
            "workers.warm_spares": warm})
        return lambda: run_training(cfg, export=False)

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(x) for x in self.metrics_path.read_text().splitlines() if x.strip()]

    def wait_steps_at(self, world: int, after_t: float, count: int, timeout_s: float) -> dict:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            rows = [m for m in self.metrics() if m["t"] > after_t and m["world_size"] == world]
            if len(rows) >= count:
                return rows[0]
            if not self.thread.is_alive():
                raise RuntimeError(f"job ended early: {self.error!r}")
            time.sleep(0.1)
        raise TimeoutError(f"no {count} steps at world size {world} within {timeout_s} s")

    def last_step_before(self, t: float) -> int:
        return max((m["step"] for m in self.metrics() if m["t"] <= t), default=0)

    def jit_done_after(self, t: float) -> bool:
        from elastic_ft.events import read_events

        return any(e["event"] == "jit_checkpoint" and e["t"] >= t
                   for e in read_events(self.out / "events.jsonl"))


def _event(job: Job, name: str, t_event: float, world: int) -> dict[str, Any]:
    first = job.wait_steps_at(world, t_event, 2, timeout_s=240)
    # what was trained before the group restarted (training may go on after the event)
    trained_before = job.last_step_before(first["t"] - 1e-6)
    row = {"event": name, "recovery_s": round(first["t"] - t_event, 2),
           "steps_lost": max(0, trained_before - (first["step"] - 1)),
           "last_step_before": trained_before, "first_step_after": first["step"]}
    if (job.out / "events.jsonl").exists():  # elastic_ft: the restart's own timeline
        from elastic_ft.events import read_events

        recoveries = [e for e in read_events(job.out / "events.jsonl")
                      if e["event"] == "recovery" and e["t"] >= t_event]
        if recoveries:
            row["timeline"] = {k: recoveries[0][k] for k in ("trigger", "total_s", "phases")}
    return row


def trial(system: str, model: Path, work: Path, health_check: str) -> list[dict[str, Any]]:
    """Runs the three events; writes WORK/SYSTEM.json before tearing the cluster down (Ray may
    crash while a job thread is still inside fit(); the results are safe by then)."""
    cluster = FakeNodeCluster(num_nodes=2, training_health_check=health_check == "training")
    try:
        job = Job(system, model, work / system, max_steps=100_000)
        job.wait_steps_at(2, 0, CHECKPOINT_EVERY + 5, timeout_s=240)
        time.sleep(SETTLE_S)
        results = []
        node = cluster.nodes[-1]
        t = time.time()
        cluster.drain_node(node, deadline_s=30)
        while time.time() < t + 5 and not (system == "elastic_ft" and job.jit_done_after(t)):
            time.sleep(0.1)
        t_loss = time.time()
        cluster.remove_node(node)
        results.append(_event(job, "drain_then_loss", t_loss, 1))
        job.wait_steps_at(1, t_loss, 5, timeout_s=120)
        time.sleep(SETTLE_S)
        t = time.time()
        cluster.add_node()
        results.append(_event(job, "join", t, 2))
        job.wait_steps_at(2, t, CHECKPOINT_EVERY + 5, timeout_s=120)
        time.sleep(SETTLE_S)
        t = time.time()
        cluster.remove_node(hard=True)
        results.append(_event(job, "hard_loss", t, 1))
        (work / f"{system}.json").write_text(json.dumps(results))
        return results
    finally:
        cluster.shutdown()


def detection(repeats: int) -> None:
    """Seconds from a fake node's hard kill until the head declares it dead, with the training
    health check and with Ray's defaults, interleaved; no training (nothing else is running)."""
    import ray

    from elastic_ft.bench.hardware import hardware_record
    from elastic_ft.bench.report import save_benchmark

    seconds: dict[str, list[float]] = {"training": [], "ray-defaults": []}
    for _ in range(repeats):
        for mode in seconds:
            cluster = FakeNodeCluster(num_nodes=1, training_health_check=mode == "training")
            try:
                node_id = cluster.nodes[0].node_id
                t0 = time.time()
                cluster.remove_node(hard=True)
                while any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()):
                    time.sleep(0.05)
                seconds[mode].append(round(time.time() - t0, 2))
            finally:
                cluster.shutdown()
    from elastic_ft.resources.node_health import SYSTEM_CONFIG

    summary = {mode: {"median_s": statistics.median(v), "runs": v}
               for mode, v in seconds.items()}
    save_benchmark({"benchmark": "node_death_detection", "hardware": hardware_record(),
                    "training_system_config": SYSTEM_CONFIG, "summary": summary}, summary)


def _span(timeline: dict[str, Any], start: str, end: str) -> float:
    t = {p["phase"]: p["t"] for p in timeline["phases"]}
    return round(t[end] - t[start], 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--systems", default="plain,elastic_ft")
    parser.add_argument("--health-check", choices=("training", "ray-defaults"),
                        default="training")
    parser.add_argument("--detection", type=int, metavar="REPEATS", default=0,
                        help="only time a hard-killed node's death detection, both settings")
    parser.add_argument("--against", type=Path, metavar="CHECKOUT",
                        help="also run elastic_ft from this checkout, alternating trials")
    parser.add_argument("--single", nargs=3, metavar=("SYSTEM", "MODEL", "WORKDIR"),
                        help=argparse.SUPPRESS)  # one trial in a fresh process
    args = parser.parse_args()
    if args.detection:
        detection(args.detection)
        return
    if args.single:
        system, model, work = args.single
        trial(system, Path(model), Path(work), args.health_check)
        os._exit(0)  # the job's thread is still inside fit() on a cluster that is gone
    import subprocess

    from elastic_ft.core.tiny_assets import make_tiny_assets

    work = Path(tempfile.mkdtemp(prefix="eft_recovery_"))
    make_tiny_assets(work / "assets")
    model = work / "assets" / "model"
    rows: list[dict[str, Any]] = []
    systems = args.systems.split(",")
    checkouts = {system: ROOT for system in systems}
    if args.against is not None:
        against = args.against.resolve()
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=against,
                                capture_output=True, text=True, check=True).stdout.strip()
        checkouts[f"elastic_ft@{commit}"] = against
        systems.append(f"elastic_ft@{commit}")
    for i in range(args.trials):
        for system in systems:
            trial_dir = work / f"trial{i}"
            trial_dir.mkdir(exist_ok=True)
            root, kind = checkouts[system], system.split("@")[0]  # plain / elastic_ft
            run_dir = trial_dir / system.replace("@", "_")
            run_dir.mkdir(exist_ok=True)
            done = subprocess.run(
                [sys.executable, str(root / "benchmarks" / "elastic_recovery.py"), "--single",
                 kind, str(model), str(run_dir), "--health-check", args.health_check],
                timeout=900, env={**os.environ, "PYTHONPATH": str(root)})
            out = run_dir / f"{kind}.json"
            if not out.exists():
                raise RuntimeError(f"{system} trial {i} failed (exit {done.returncode})")
            for row in json.loads(out.read_text()):
                rows.append({"system": system, "trial": i, **row})
                print(json.dumps(rows[-1]), flush=True)
    summary: dict[str, Any] = {}
    for system in systems:
        for event in ("drain_then_loss", "join", "hard_loss"):
            sel = [r for r in rows if r["system"] == system and r["event"] == event]
            summary[f"{system}/{event}"] = {
                "median_recovery_s": statistics.median(r["recovery_s"] for r in sel),
                "median_steps_lost": statistics.median(r["steps_lost"] for r in sel),
                "runs": len(sel)}
            timelines = [r["timeline"] for r in sel if "timeline" in r]
            if timelines:  # median seconds of each phase over the trials
                names = [p["phase"] for p in timelines[0]["phases"]]
                summary[f"{system}/{event}"]["phases_s"] = {
                    n: statistics.median(p["s"] for t in timelines for p in t["phases"]
                                         if p["phase"] == n) for n in names}
                # Ray Train starting the workers, then the training function up to its first
                # step: the share elastic_ft's own code decides
                summary[f"{system}/{event}"]["median_ray_worker_start_s"] = statistics.median(
                    _span(t, "new_group_scheduling", "new_workers_started") for t in timelines)
                summary[f"{system}/{event}"]["median_train_fn_to_first_step_s"] = (
                    statistics.median(_span(t, "train_fn_entered", "first_step")
                                      for t in timelines))
    from elastic_ft.bench.hardware import hardware_record
    from elastic_ft.bench.report import save_benchmark
    from elastic_ft.resources.node_health import SYSTEM_CONFIG

    hardware = hardware_record()
    name = ("elastic_recovery" if args.health_check == "training"
            else "elastic_recovery_ray_health_defaults")
    result = {"benchmark": name, "hardware": hardware, "health_check": args.health_check,
              "ray_system_config": SYSTEM_CONFIG if args.health_check == "training" else {},
              "checkpoint_every_steps": CHECKPOINT_EVERY,
              "resize_interval_s": RESIZE_INTERVAL_S, "summary": summary, "rows": rows}
    save_benchmark(result, summary)


if __name__ == "__main__":
    main()
