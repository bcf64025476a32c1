"""The per-worker recipe under Ray Train: plan -> model -> engine -> resume -> steps -> save.

Each rank has its own micro-batch (its device's share) and all share one accumulation count.
Loss normalisation (core/step.py): each micro-batch returns its summed token loss divided by
N / (W * a), where N is the trainable-token count of the whole global batch. DeepSpeed divides
by `a` and averages over W ranks, so every step minimises the mean over all N tokens whatever
the split: resizing the group or re-splitting it changes the schedule, not the trajectory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from elastic_ft.config import RunConfig
from elastic_ft.core.checkpoint import (
    TAG,
    check_resumable,
    model_fingerprint,
    needs_universal,
)
from elastic_ft.core.controller_link import MetricsOutbox, RequestPoll
from elastic_ft.core.worker_checkpoint import (
    UploadInFlight,
    newest_checkpoint,
    ray_train_preemption_info,
    release_universal_copy,
    save_and_report,
    save_final,
    universal_copy,
    wait_for_restart,
)
from elastic_ft.core.worker_env import (
    hold_to_cuda_cap,
    peak_mem_bytes,
    process_started_t,
    rank_place,
    training_mem_bytes,
)
from elastic_ft.data.prepared import DataPosition, PreparedData, rank_slots
from elastic_ft.data.shards import RankFeed, ShardReader


def train_worker(config: dict[str, Any]) -> None:
    # rank 0's part of the restart's timeline (resources/recovery.py)
    marks = {"worker_process_started": process_started_t(), "train_fn_entered": time.time()}
    from elastic_ft.core.lean_imports import import_deepspeed

    import_deepspeed()  # before torch work, so its accelerator is chosen once
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from elastic_ft.core.engine import apply_lr_scale, build_engine
    from elastic_ft.core.evaluate import Evaluator
    from elastic_ft.core.model import load_model
    from elastic_ft.core.safe_load import weights_only_loads
    from elastic_ft.core.step import Faults, StepOutOfMemory, train_step
    from elastic_ft.resources import sigterm
    from elastic_ft.resources.planning import WorkerPlan
    from elastic_ft.resources.replan_restart import ReplanRestart
    from elastic_ft.resources.worker_setup import adopt_actor_threads, check_cuda_untouched

    check_cuda_untouched()
    adopt_actor_threads()
    marks["imported"] = time.time()
    sigterm.arm()  # from here a first SIGTERM means "checkpoint now", not "exit now"
    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    controller = config["controller"]
    faults = Faults.from_env()  # documented fault injection; off unless the node sets it
    torch.manual_seed(cfg.train.seed)
    # the schedule's index of the blocks (trainable tokens, sample ids); the tokens themselves
    # come through Ray Train's dataset shard (data/shards.py)
    data = PreparedData(ray.get(config["index_ref"]))
    total_steps: int = config["total_steps"]

    places: list[Any] = [None] * world
    dist.all_gather_object(places, rank_place())
    node_ids, pids = [p["node_id"] for p in places], [p["pid"] for p in places]
    # each rank's own micro-batch from its own device's budget; one accumulation for all
    box = [(ray.get(controller.plan.remote(places)), ray.get(controller.evals_done.remote()))
           if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    plan_dict: dict[str, Any] = box[0][0]
    evals_done: set[int] = set(box[0][1])  # steps whose eval is recorded (a re-run's too)
    plan = WorkerPlan.from_dict(plan_dict)
    m, a, g = plan.micro_batch(rank), plan.grad_accum, plan.global_batch

    marks["planned"] = time.time()
    checkpoint = newest_checkpoint(cfg, rank, controller)
    marks["checkpoint_verified"] = time.time()
    state: dict[str, Any] | None = None
    ckpt_dir: Path | None = None
    ckpt_ctx = checkpoint.as_directory() if checkpoint is not None else None
    if ckpt_ctx is not None:
        ckpt_dir = Path(ckpt_ctx.__enter__())
        import json

        state = json.loads((ckpt_dir / "state.json").read_text())
    universal = state is not None and needs_universal(state, world)
    # The data starts where the checkpoint does; the reader fetches its first blocks from the
    # object store while the model loads. Every rank computes the same schedule from the
    # checkpoint's state and the plan (data/shards.py).
    t_shard = time.time()
    schedule = {"position": state["position"] if state else DataPosition().to_dict(),
                "steps": total_steps - (int(state["step"]) if state else 0),
                "world_size": world, "micro_batches": list(plan.micro_batches),
                "grad_accum": a, "global_batch": g, "seed": cfg.train.seed,
                "shuffle": cfg.data.shuffle}
    blocks = config["blocks"]
    micro_batches = ShardReader(RankFeed(blocks.refs, blocks.first_rows, schedule, rank),
                                prefetch_batches=a)
    shard_open_s = time.time() - t_shard
    marks["data_stream_opened"] = time.time()

    from elastic_ft.core.model import trainable_parameters

    hold_to_cuda_cap()
    baseline_bytes = peak_mem_bytes()
    model = load_model(cfg)
    marks["model_loaded"] = time.time()
    engine, scheduler = build_engine(cfg, model, plan, total_steps, universal, rank)
    marks["engine_built"] = time.time()
    step, position = 0, DataPosition()
    if state is not None and ckpt_dir is not None:
        check_resumable(state, cfg.method.kind, model_fingerprint(engine.module), ckpt_dir,
                        cfg.optim.name)
        t0 = time.time()
        load_dir, tag = ((universal_copy(ckpt_dir, checkpoint.path, ctx.get_local_rank()),
                          f"{TAG}_universal") if universal else (ckpt_dir, TAG))
        with weights_only_loads():  # DeepSpeed's loader would unpickle: code could run
            engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        apply_lr_scale(cfg, plan, scheduler)  # the checkpoint carries the old plan's rate
        if universal:
            release_universal_copy(load_dir, ctx.get_local_rank())
        step, position = int(state["step"]), DataPosition(**state["position"])
        marks["checkpoint_loaded"] = time.time()
        if rank == 0:
            controller.record.remote("resume", {
                "step": step, "world_size": world, "from_world_size": state["world_size"],
                "universal": universal, "load_s": round(time.time() - t0, 3),
                "position": position.to_dict(), "lr": scheduler.get_last_lr()[0]})
    if ckpt_ctx is not None:
        ckpt_ctx.__exit__(None, None, None)
    if rank == 0:
        trainable, total = trainable_parameters(engine.module)
        controller.record.remote("start", {"world_size": world, "step": step, "plan": plan_dict,
                                           "pids": pids, "nodes": node_ids,
                                           "shard_open_s": round(shard_open_s, 3),
                                           "trainable_params": trainable, "total_params": total})

    evaluator = (Evaluator(cfg, ray.get(config["eval_ref"]), config["eval_prompts"],
                           total_steps) if config.get("eval_ref") is not None else None)
    eval_micro = min(plan.micro_batches)  # one width on every rank: ZeRO-3 forwards in step

    def evaluate_if_due(resumed: bool = False) -> None:
        if evaluator is not None and evaluator.due(step) and not (resumed and step in evals_done):
            evaluator.run(engine, step, eval_micro, rank, world, controller)

    evaluate_if_due(resumed=True)  # an eval cut by the restart that brought this group here
    device = engine.device
    poll = RequestPoll(controller) if rank == 0 else None
    outbox = MetricsOutbox(controller)
    after_checkpoint = False  # the previous step took a checkpoint
    uploads = UploadInFlight()  # this rank's periodic checkpoint upload in flight
    t_start, tokens_done = time.time(), 0
    last_forward_s = 0.0  # the previous step's forward compute (0: none yet)
    log_sample_ids = cfg.train.log_sample_ids

    def next_micro(slot: list[int]) -> dict[str, Any]:
        micro = micro_batches.next()
        if micro["slot"].tolist() != slot:  # a stream out of order would train silently
            raise RuntimeError(f"elastic_ft: rank {rank} step {step + 1} got blocks "
                               f"{micro['slot'].tolist()}, schedule says {slot}")
        return micro

    try:
        while step < total_steps:
            t_step = time.time()
            indices, next_position = data.global_batch(position, g, cfg.train.seed,
                                                       cfg.data.shuffle)
            n_trainable = max(1, data.trainable_tokens(indices))
            try:
                result = train_step(engine, rank_slots(indices, plan.micro_batches, rank, a),
                                    next_micro, n_trainable, world, a, faults)
            except StepOutOfMemory as error:
                # Forward, backward or optimizer step: this rank's device gets a smaller cap and
                # the group restarts from the newest checkpoint, not counted as a failure.
                if ray.get(controller.oom.remote(rank, m, step + 1, error.phase)):
                    raise ReplanRestart("memory", str(error)) from error
                raise
            if sigterm.take_notice() is not None:
                controller.preemption_notice.remote(ray.get_runtime_context().get_node_id(), {
                    "source": "sigterm", "kind": "sigterm", "deadline_s": None,
                    "detail": f"SIGTERM to rank {rank} (pid {os.getpid()}) in step {step + 1}"})
            request = poll.take() if poll is not None else None
            # One small all-gather per step carries every rank's loss, token count, peak memory
            # and compute time, and whether rank 0 holds a controller request; the request itself
            # is broadcast only when one exists. On the device: NCCL groups have no CPU backend.
            # The compute time rides one step late: this step's GPU clock can be read only after
            # this collective, which a second one per step would cost.
            mine = torch.tensor([0.0, float(result.real_tokens), float(request is not None),
                                 float(training_mem_bytes(baseline_bytes)), last_forward_s],
                                dtype=torch.float64, device=device)
            mine[0] = result.loss_sum
            gathered = [torch.zeros_like(mine) for _ in range(world)]
            dist.all_gather(gathered, mine)
            table = torch.stack(gathered).cpu()  # one copy to the host per step (a sync on GPU)
            last_forward_s = result.forward.seconds()  # after the sync: its events are done
            step += 1
            position = next_position
            step_loss = table[:, 0].sum().item() / (world * a)
            step_tokens = int(table[:, 1].sum().item())
            tokens_done += step_tokens
            now = time.time()
            if table[:, 2].max().item() > 0:
                box = [request]
                dist.broadcast_object_list(box, src=0)
                request = box[0]
            if request is not None and request.get("kind") == "drain":
                info = ray_train_preemption_info()
                if rank == 0 and info is not None:
                    controller.record.remote("preemption_info", {
                        "step": step, "deadline_ms": info.deadline_ms,
                        "ranks_by_node": {k: list(v) for k, v in
                                          info.preempted_node_to_ranks.items()}})

            rank_mem = [int(x) for x in table[:, 3].tolist()]
            metrics = {"step": step, "loss": step_loss, "lr": scheduler.get_last_lr()[0],
                       "tokens": tokens_done, "step_s": now - t_step,
                       "data_wait_s": result.data_wait_s,
                       "tokens_per_s": step_tokens / max(1e-9, now - t_step),
                       "peak_mem_bytes": peak_mem_bytes(), "train_mem_bytes": max(rank_mem),
                       "world_size": world, "epoch": position.epoch}
            if rank == 0 and marks:  # this group's first step: its recovery timeline is whole
                controller.group_ready.remote(marks, now, world, step)
                marks = {}
            periodic = step % cfg.checkpoint.every_steps == 0 or step == total_steps
            if rank == 0:
                outbox.add(dict(
                    metrics, t=now, trained_real_tokens=step_tokens, rank_mem_bytes=rank_mem,
                    rank_forward_s=[round(x, 6) for x in table[:, 4].tolist()],
                    sample_ids=data.sample_ids(indices) if log_sample_ids else None),
                    now, send_now=periodic or after_checkpoint or request is not None)
            after_checkpoint = periodic or request is not None
            if periodic or request is not None:
                if rank == 0 and request is not None:
                    controller.record.remote("jit_checkpoint_started", {
                        "step": step, "reason": request["kind"]})
                # A just-in-time checkpoint must be in storage before the group restarts: sync.
                sync = request is not None or cfg.checkpoint.upload == "sync"
                # a periodic save waits for this rank's previous upload; a just-in-time one
                # does not (its upload runs beside it, and the notice's deadline counts)
                save_and_report(engine, cfg, metrics, step, position, world, rank, plan_dict,
                                controller, sync,
                                jit_kind=request["kind"] if request is not None else None,
                                in_flight=uploads if request is None else None)
                if request is not None and request.get("restart") and step < total_steps:
                    wait_for_restart(cfg, request)
                if poll is not None:
                    poll.rearm()
            # after the checkpoint: a restart that follows it (just-in-time) leaves this step's
            # eval to the new group; one that never came (wait over) lets it run here
            evaluate_if_due()
            # No ray.train.report() on other steps: in Ray Train V2 every report is a barrier
            # across workers that costs ~2 s of polling (measured: 0.04 s steps took 2 s).
            # Metrics go to the controller instead.
    finally:
        outbox.flush()  # also when a step fails: the rows of its group's last steps count

    micro_batches.close()
    all_peaks = [0] * world
    dist.all_gather_object(all_peaks, peak_mem_bytes())
    save_final(engine, cfg, rank)
    sigterm.disarm()  # done: Ray's own shutdown may SIGTERM this process
    if rank == 0:
        controller.record.remote("end", {"step": step, "world_size": world,
                                         "peak_mem_bytes": all_peaks,
                                         "wall_s": round(time.time() - t_start, 3)})

