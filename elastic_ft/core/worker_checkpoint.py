"""Checkpoint side of the worker recipe: which checkpoint to resume, save + report to Ray
Train, wait for a restart after a just-in-time checkpoint, and the final weights."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from elastic_ft.config import RunConfig
from elastic_ft.core.checkpoint import (
    checkpoint_dir_name,
    model_fingerprint,
    save_rank_checkpoint,
)
from elastic_ft.data.prepared import DataPosition


def universal_copy(ckpt_dir: Path, checkpoint_path: str, local_rank: int) -> Path:
    """The checkpoint in DeepSpeed's universal format (a resume at another world size), made
    once per node: the node's local rank 0 converts it into a folder named after the node and
    the checkpoint, and the node's other ranks load that copy. Eight ranks of a GPU node do
    one conversion of the checkpoint, not eight at once. Every rank calls this.

    "Node" is what Ray Train's local ranks count: its IP address (fake nodes of one machine
    share it, and their /tmp: one copy for all of them)."""
    import ray
    import torch.distributed as dist

    from elastic_ft.core.checkpoint import to_universal

    node = ray.util.get_node_ip_address().replace(":", "_")
    name = hashlib.sha1(checkpoint_path.encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"eft_universal_{node}_{name}"
    if local_rank == 0:
        to_universal(ckpt_dir, out)
    dist.barrier()  # the node's copy is complete
    return out


def release_universal_copy(load_dir: Path, local_rank: int) -> None:
    """Every rank has loaded: the node's converted copy is removed (not left in /tmp)."""
    import torch.distributed as dist

    dist.barrier()
    if local_rank == 0:
        shutil.rmtree(load_dir, ignore_errors=True)


def newest_checkpoint(cfg: RunConfig, rank: int, controller: Any) -> Any:
    """The newest checkpoint in the run's storage that verifies, or None for a fresh start.

    Ray Train registers a reported checkpoint only when its controller next polls the
    workers: a just-in-time checkpoint taken right before a node vanishes is fully uploaded
    but may never be registered. And Ray's registered checkpoint may since have been
    corrupted. So rank 0 verifies what storage holds (a local or shared path, or a URI such
    as s3://: manifests, sizes, checksums, read in place), skips bad ones with an event, and
    every rank loads the same one. A checkpoint this run has hashed already (the controller's
    prune hashes each one once, after its upload) is checked by manifests and sizes only.
    """
    import ray
    import torch.distributed as dist
    from ray.train import Checkpoint

    from elastic_ft.core.checkpoint import find_latest_valid, run_storage

    fs, run_dir = run_storage(cfg.resolved_storage_path())
    box: list[str | None] = [None]
    if rank == 0:
        def skipped(message: str) -> None:
            controller.record.remote("checkpoint_invalid", {"error": message})

        hashed = ray.get(controller.hashed_checkpoints.remote())
        known = dict(hashed)
        latest = find_latest_valid(run_dir, log=skipped, fs=fs, hashed=hashed)
        if hashed != known:
            controller.checkpoints_hashed.remote(hashed)
        box[0] = latest.path if latest is not None else None
    dist.broadcast_object_list(box, src=0)
    return Checkpoint(box[0], filesystem=fs) if box[0] else None


def ray_train_preemption_info(tries: int = 6, interval_s: float = 0.5) -> Any:
    """Ray Train's own view of a drain our controller saw (its watcher polls more slowly).

    `get_preemption_info` is a barrier returning one agreed value to every rank, so all
    ranks leave this loop at the same iteration.
    """
    import ray.train

    for _ in range(tries):
        info = ray.train.get_preemption_info()
        if info is not None:
            return info
        time.sleep(interval_s)
    return None


class UploadInFlight:
    """At most one checkpoint upload in flight per rank: a save waits for the previous upload.

    Ray Train uploads async checkpoints on one thread per worker, and that thread also waits
    for Ray Train's controller to take each report (one per poll, 1 s). Checkpoints saved
    faster than that queue up, and the newest one complete in storage (what a hard node loss
    resumes from) falls further behind the longer the group trains: 65-141 steps lost were
    measured at a checkpoint every 0.8 s. torchtitan's async checkpointer waits the same way.
    """

    def __init__(self) -> None:
        self._done = threading.Event()
        self._done.set()

    def wait(self) -> float:
        """Block until the previous upload is in storage; the seconds waited."""
        t0 = time.time()
        self._done.wait()
        return time.time() - t0

    def started(self) -> None:
        self._done.clear()

    def finished(self) -> None:
        self._done.set()


def save_and_report(engine: Any, cfg: RunConfig, metrics: dict[str, Any], step: int,
                     position: DataPosition, world: int, rank: int, plan: dict[str, Any],
                     controller: Any, sync: bool, jit_kind: str | None = None,
                     in_flight: UploadInFlight | None = None) -> None:
    """Save this rank's shard locally, then hand it to Ray Train (which merges the ranks).

    Async: `report` returns once the local save is done and Ray uploads in the background
    (deleting the local copy after); sync: it returns after the upload. Either way each rank
    tells the controller once its part is in storage: a just-in-time checkpoint counts as
    taken when every rank's is, not when Ray Train registers it (a resizing Ray Train
    controller waits for it and registers nothing meanwhile). With `in_flight`, the save
    first waits for this rank's previous upload.
    """
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    in_flight = in_flight or UploadInFlight()
    upload_wait_s = in_flight.wait()
    state = {"step": step, "position": position.to_dict(), "world_size": world,
             "zero_stage": cfg.deepspeed.zero_stage, "method": cfg.method.kind,
             "optim": cfg.optim.name, "plan": plan,
             "model": model_fingerprint(engine.module), "saved_at": time.time()}
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="eft_ckpt_")
    save_rank_checkpoint(engine, Path(tmp), rank, state if rank == 0 else None)
    t_saved = time.time()

    def upload_then_tell(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
        try:
            storage = ray.train.get_context().get_storage()
            persisted = storage.persist_current_checkpoint(checkpoint, dir_name)
            controller.uploaded.remote(step, rank, world, jit_kind, t0)
        finally:  # a failed upload ends the run (Ray raises it in the training thread)
            in_flight.finished()
        return persisted

    in_flight.started()
    ray.train.report(dict(metrics, checkpoint_step=step),
                     checkpoint=Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=checkpoint_dir_name(step, t0),
                     checkpoint_upload_mode=CheckpointUploadMode.SYNC if sync
                     else CheckpointUploadMode.ASYNC,
                     checkpoint_upload_fn=upload_then_tell,
                     delete_local_checkpoint_after_upload=True)
    if rank == 0:
        controller.record.remote("checkpoint", {
            "step": step, "world_size": world, "position": position.to_dict(),
            "mode": "sync" if sync else "async", "save_s": round(t_saved - t0, 3),
            "upload_wait_s": round(upload_wait_s, 3),
            "seconds": round(time.time() - t0, 3)})


def wait_for_restart(cfg: RunConfig, request: dict[str, Any]) -> None:
    """After a just-in-time checkpoint for a resize, idle until Ray Train restarts the group.

    Steps trained now would be lost at the restart. A grow's restart follows at once (Ray
    Train waited for this checkpoint); a drain's when the node goes; if it never comes,
    training simply continues. A re-plan (memory, rebalance) restarts the group itself, and
    Ray Train does not count it as a failure (resources/replan_restart.py).
    """
    if request.get("kind") in ("memory", "rebalance"):
        from elastic_ft.resources.replan_restart import ReplanRestart

        raise ReplanRestart(request["kind"], request.get("reason", ""))
    deadline = time.time() + cfg.elastic.restart_wait_s
    while time.time() < deadline:
        time.sleep(0.5)


def save_final(engine: Any, cfg: RunConfig, rank: int) -> None:
    """Adapter (LoRA) or full weights to OUTPUT/final, gathered across ZeRO-3 shards."""
    if cfg.deepspeed.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank != 0:
        return
    out = Path(cfg.output_dir) / "final"
    out.mkdir(parents=True, exist_ok=True)
    module = engine.module
    if cfg.method.kind in ("lora", "qlora"):
        from peft import get_peft_model_state_dict

        module.save_pretrained(str(out), state_dict=get_peft_model_state_dict(
            module, state_dict=state_dict))
    else:
        module.save_pretrained(str(out), state_dict=state_dict, safe_serialization=True)
    os.sync()
