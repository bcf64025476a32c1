"""The driver: config -> data -> controller -> Ray Train fit -> summary and export."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from elastic_ft.config import RunConfig
from elastic_ft.core.checkpoint import RUN_NAME, find_latest_valid, prune_checkpoints, run_storage
from elastic_ft.core.model import tokenizer_path
from elastic_ft.events import EventLog, read_events, redact
from elastic_ft.report.console import get_console
from elastic_ft.report.cost import write_cost_report
from elastic_ft.report.summary import eval_scores, write_summary
from elastic_ft.report.trackers import check_trackers, open_trackers

API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
INVENTORY_WAIT_S = 30.0  # for every node alive to report, before the inventory is logged


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Connect to RAY_ADDRESS, or start an embedded local Ray (dashboard on 127.0.0.1).

    Returns True when this call started Ray (the caller then shuts it down).
    """
    import ray

    from elastic_ft.resources import worker_setup

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=worker_setup.RUNTIME_ENV)
    else:
        # ELASTIC_FT_DASHBOARD=0: no dashboard (an image without ray[default]'s packages)
        start_local_ray(num_cpus, os.environ.get("ELASTIC_FT_DASHBOARD", "1") != "0", True)
    return True


def start_local_ray(num_cpus: int | None, include_dashboard: bool, log_to_driver: bool) -> None:
    """A new embedded Ray cluster ("local": even if a `ray start` head runs on this machine)
    whose own processes find it through the state API.

    Without a RAY_ADDRESS, state-API calls made inside the cluster (Ray Train's placement-group
    cleaner asks every second whether the controller lives) look the cluster up in
    /tmp/ray/ray_current_cluster, which names the last `ray start` head, not this cluster. A
    dead head there costs 12 s at the end of every `fit()` (the cleaner waits on a GCS that
    never answers); a live one tells the cleaner our controller is gone, and it quits before it
    can guard our placement group. Exporting RAY_API_SERVER_ADDRESS, with the dashboard on a
    port picked here, before the raylet starts points them at this cluster (without a
    dashboard, the calls fail at once). It is restored after: a later cluster in this process
    must not inherit it.
    """
    import ray

    from elastic_ft.core.ports import free_port
    from elastic_ft.resources import worker_setup

    port = free_port()
    previous = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                 dashboard_host="127.0.0.1", dashboard_port=port, log_to_driver=log_to_driver,
                 runtime_env=worker_setup.RUNTIME_ENV)
    finally:
        if previous is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = previous


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def resolve_use_gpu(cfg: RunConfig) -> bool:
    import ray

    if isinstance(cfg.workers.use_gpu, bool):
        return cfg.workers.use_gpu
    return ray.cluster_resources().get("GPU", 0) > 0


def total_steps_for(cfg: RunConfig, n_blocks: int) -> int:
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    steps_per_epoch = -(-n_blocks // cfg.train.global_batch)
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def run_training(cfg: RunConfig, export: bool = True) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.v2.api.config import LoggingConfig
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from elastic_ft.core.devices import budgets_by_type, hosting_nodes
    from elastic_ft.core.evaluate import prompt_records
    from elastic_ft.core.optimizer import resolve_caps
    from elastic_ft.core.train_loop import train_worker
    from elastic_ft.data.eval_data import EvalSet
    from elastic_ft.data.pipeline import prepare_data
    from elastic_ft.data.shards import store_blocks
    from elastic_ft.report.follower import RunFollower
    from elastic_ft.resources.controller import CONTROLLER_NAME, ElasticController
    from elastic_ft.resources.fleet import Fleet
    from elastic_ft.resources.recovery_clock import RecoveryClock
    from elastic_ft.resources.replan_restart import ElasticTorchTrainer
    from elastic_ft.resources.restart_gate import (
        CheckpointBeforeResize,
        RefreshBeforeSizing,
        start_drain_aware_coordinator,
    )
    from elastic_ft.resources.warm_pool import model_type_of, warm_env_vars, warm_modules

    t0 = time.time()
    check_trackers(cfg.logging.trackers)  # a missing package fails before any compute
    console = get_console()
    cfg = cfg.with_absolute_paths()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False))
    events = EventLog(out / "events.jsonl")
    # Ray's 60 s default start timeout turns a lost node into a minute of waiting.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
                          str(int(cfg.workers.start_timeout_s)))
    # Ray Train's controller takes one reported checkpoint per poll (default every 2 s) and a
    # report blocks until its turn: a just-in-time checkpoint waits behind that queue.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1")
    os.environ.setdefault("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "1")
    started_ray = ensure_ray()
    _quiet_ray_data()
    elastic = cfg.workers.min < cfg.workers.max
    try:
        # before Ray Data or Ray Train start the plain one, which would stay (restart_gate.py)
        events.emit("coordinator", drain_aware=start_drain_aware_coordinator())
        prepared, report = prepare_data(cfg.data, tokenizer_path(cfg), out, engine="ray",
                                        trust_remote_code=cfg.model.trust_remote_code,
                                        evaluation=cfg.eval)
        console.line(report.table())
        evalset = EvalSet.open(out) if cfg.eval.enabled else None
        total_steps = total_steps_for(cfg, len(prepared))
        use_gpu = resolve_use_gpu(cfg)
        storage = cfg.resolved_storage_path()
        # Which checkpoint to resume (a re-run, a restart, a resize) is decided in one place:
        # rank 0 verifies the storage when the group starts (worker_checkpoint.py).
        events.emit("run_start", total_steps=total_steps, use_gpu=use_gpu,
                    min_workers=cfg.workers.min, max_workers=cfg.workers.max)

        resources = dict(cfg.workers.resources_per_worker) or (
            {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1})
        here = ray.get_runtime_context().get_node_id()
        from elastic_ft.core.lomo import MAX_GRAD_ACCUM  # here: it imports torch

        fleet = Fleet(None, cfg.train.global_batch, use_gpu, cfg.train.mem_fraction,
                      cfg.train.mem_cap_bytes, cfg.elastic.rebalance_threshold,
                      cfg.elastic.rebalance_window_steps, total_steps,
                      cfg.elastic.restart_estimate_s,
                      max_grad_accum=MAX_GRAD_ACCUM if cfg.optim.name == "lomo" else None)
        controller_name = f"{CONTROLLER_NAME}_{os.getpid()}_{int(t0)}"
        controller = ray.remote(ElasticController).options(
            name=controller_name, num_cpus=0, max_concurrency=16,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(str(out), fleet, cfg.workers.min, cfg.workers.max,
                 resources, cfg.elastic.monitor_interval_s, 8,
                 cfg.elastic.jit_checkpoint_on_join, True, cfg.elastic.restart_wait_s,
                 cfg.elastic.preemption_urls, cfg.elastic.preemption_poll_s,
                 storage, cfg.checkpoint.keep, cfg.checkpoint.keep_best)
        # Each rank's budget comes from its own device: its node's monitor, or what the rank
        # reports of it before the monitor's first sample. `auto` probes the micro-batch cap
        # per device type, on a node of that type, from the inventory, before any group
        # starts; a fixed micro-batch needs no inventory, so Ray Train starts its group while
        # the monitors report (about 4 s of every run start: processes starting).
        announce = threading.Thread(target=_announce_inventory, daemon=True,
                                    args=(controller, resources, console, events))
        announce.start()
        if cfg.train.micro_batch == "auto":
            announce.join()
            caps = resolve_caps(cfg, use_gpu, budgets_by_type(
                cfg, use_gpu, hosting_nodes(resources), ray.get(controller.samples.remote())),
                events)
        else:
            caps = resolve_caps(cfg, use_gpu, {}, events)
        ray.get(controller.set_caps.remote(caps))
        warm = elastic if cfg.workers.warm_spares is None else cfg.workers.warm_spares
        ray.get(controller.set_warm_spares.remote(controller_name if warm else None))
        num_workers: int | tuple[int, int] = (
            (cfg.workers.min, cfg.workers.max) if elastic else cfg.workers.min)
        # a grow's restart waits for the workers' just-in-time checkpoint; the first group and
        # a restart after a failure are sized from fresh reservations (restart_gate.py)
        gate: list[Any] = ([CheckpointBeforeResize(controller, cfg.elastic.jit_checkpoint_timeout_s)]
                           if elastic and cfg.elastic.jit_checkpoint_on_join else [])
        gate += [RefreshBeforeSizing()] if elastic else []
        gate.append(RecoveryClock(controller))  # each restart's phases (`recovery` events)
        # a memory re-plan or rebalance restart is not counted as a failure
        trainer = ElasticTorchTrainer(
            train_worker,
            train_loop_config={"run": cfg.to_dict(), "controller": controller,
                               "index_ref": ray.put(prepared.table.select(
                                   ["n_trainable", "sample_ids"])), "total_steps": total_steps,
                               "blocks": store_blocks(prepared.table),  # data/shards.py
                               "eval_ref": ray.put(evalset.table) if evalset else None,
                               "eval_prompts": prompt_records(cfg, evalset.prompts)
                               if evalset else []},
            scaling_config=ScalingConfig(
                num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources,
                elastic_resize_monitor_interval_s=cfg.workers.resize_interval_s),
            run_config=RayRunConfig(
                name=RUN_NAME, storage_path=storage,
                failure_config=FailureConfig(max_failures=cfg.workers.max_failures),
                # keep-N is ours (prune_checkpoints): Ray's would delete the older valid
                # checkpoints even when the newest one has since been corrupted
                checkpoint_config=CheckpointConfig(num_to_keep=None), callbacks=gate,
                worker_runtime_env={"env_vars": warm_env_vars(
                    controller_name, ray.get_runtime_context().namespace,
                    "cuda" if use_gpu else "cpu",
                    warm_modules(model_type_of(cfg.model.name_or_path)))} if warm else {},
                logging_config=LoggingConfig(log_level="WARNING")),
        )
        trackers = open_trackers(cfg, out)
        follower = RunFollower(out, console, trackers, total_steps).start()
        try:
            trainer.fit()
        except Exception as error:
            raise _failed_run(error, cfg, storage, events) from error
        finally:
            announce.join(timeout=INVENTORY_WAIT_S)
            follower.stop()
            for tracker in trackers:
                tracker.close()
            hashed: dict[str, str] = {}
            try:
                hashed = ray.get(controller.hashed_checkpoints.remote(), timeout=10)
                ray.get(controller.shutdown.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(controller)
        try:  # the last async upload too; a finished run does not fail over a prune
            fs, run_dir = run_storage(storage)
            prune_checkpoints(run_dir, cfg.checkpoint.keep, fs, eval_scores(
                read_events(events.path)) if cfg.checkpoint.keep_best else None, hashed)
        except OSError as error:
            events.emit("prune_error", error=repr(error))
        summary = write_summary(cfg, out, report, time.time() - t0)
        if export:  # on a node with the memory for it, not here (core/export.py)
            from elastic_ft.core.export import export_on_cluster

            starts = [e for e in read_events(events.path) if e["event"] == "start"]
            rank0_node = (starts[-1].get("nodes") or [None])[0] if starts else None
            summary["exported"] = export_on_cluster(cfg, rank0_node)
            events.emit("exported", **summary["exported"])
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        events.emit("run_end", wall_s=round(time.time() - t0, 3))
        console.line(write_cost_report(out).table())
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def _announce_inventory(controller: Any, resources: dict[str, float], console: Any,
                        events: EventLog) -> None:
    """Print and log the monitors' inventory once every node alive has reported (the cost
    report prices each node from it)."""
    from elastic_ft.core.devices import wait_for_inventory
    from elastic_ft.resources.inventory import render_inventory

    inventory = wait_for_inventory(controller, resources, timeout_s=INVENTORY_WAIT_S)
    console.line(render_inventory(inventory))
    events.emit("inventory", nodes=inventory)


def _failed_run(error: Exception, cfg: RunConfig, storage: str, events: EventLog) -> RuntimeError:
    """Ray Train gave up (failure budget spent, or a non-retryable error): say what is left."""
    fs, run_dir = run_storage(storage)
    latest = find_latest_valid(run_dir, fs=fs)
    restarts = len([e for e in read_events(events.path) if e["event"] == "resume"])
    where = (f"newest valid checkpoint: {latest.path} (step {latest.state['step']})"
             if latest else "no valid checkpoint was written")
    message = (f"elastic_ft: training stopped after the failure budget was spent or a "
               f"non-retryable error (workers.max_failures={cfg.workers.max_failures}, "
               f"restarts so far {restarts}); {where}; re-run the same command to resume. "
               f"Cause: {str(error).splitlines()[0][:300]}")
    events.emit("run_failed", message=message)
    try:  # what the run cost so far, next to the error
        write_cost_report(cfg.output_dir)
    except Exception as report_error:
        events.emit("warning", message=f"cost report not written: {report_error!r}")
    return RuntimeError(message)
