"""Build the DeepSpeed engine for one worker from the run config and its batch plan."""

from __future__ import annotations

import math
from typing import Any

from elastic_ft.config import RunConfig
from elastic_ft.core.memory import reduce_bucket_elems
from elastic_ft.resources.planning import WorkerPlan


def deepspeed_config(cfg: RunConfig, plan: WorkerPlan, load_universal: bool,
                     hidden_size: int, rank: int = 0) -> dict[str, Any]:
    """This rank's engine config. DeepSpeed checks train_batch == micro * accum * world on
    each rank alone; with an uneven split each rank states its own share as if all ranks had
    it. Nothing crosses ranks but the shared accumulation, so every rank reaches its one
    gradient-accumulation boundary per step at the same micro-step."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        # Buckets sized to the model (Hugging Face's "auto"), not DeepSpeed's 5e8 elements.
        zero["reduce_bucket_size"] = reduce_bucket_elems(hidden_size)
    if ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(0.9 * reduce_bucket_elems(hidden_size))
        # Export needs full weights on rank 0; the gather happens once, at the end.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": plan.micro_batch(rank),
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.micro_batch(rank) * plan.grad_accum * plan.world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.train.precision == "bf16"},
        "fp16": {"enabled": cfg.train.precision == "fp16", "initial_scale_power": 12},
        # A plain torch optimizer under ZeRO-Offload is fine and skips a 50 s JIT compile.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: RunConfig, total_steps: int):
    warmup, schedule = cfg.optim.warmup_steps, cfg.optim.schedule

    def scale(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return scale


def build_engine(cfg: RunConfig, model: Any, plan: WorkerPlan, total_steps: int,
                 load_universal: bool, rank: int = 0) -> tuple[Any, Any]:
    import torch

    from elastic_ft.core.build_locks import release_stale_build_locks
    from elastic_ft.core.lean_imports import import_deepspeed

    deepspeed = import_deepspeed()

    lr = cfg.optim.lr * plan.lr_scale
    if cfg.optim.name == "lomo":  # no DeepSpeed: the update is fused into the backward
        from elastic_ft.core.lomo import build_lomo_engine

        return build_lomo_engine(model, lr, lr_lambda(cfg, total_steps), cfg.optim.grad_clip,
                                 cfg.optim.weight_decay, cfg.train.precision, rank)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim.name == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, betas=cfg.optim.betas,
                                      weight_decay=cfg.optim.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    release_stale_build_locks()  # else a worker killed in an op's build stalls this one
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, plan, load_universal, model.config.hidden_size, rank),
        dist_init_required=False)
    return engine, scheduler


def apply_lr_scale(cfg: RunConfig, plan: WorkerPlan, scheduler: Any) -> None:
    """After a resume: the scheduler's state from the checkpoint carries the old plan's base
    learning rate; this plan's global batch may differ (the linear scaling rule), so its own
    scale is put back, and the current rate recomputed at the restored step."""
    base = cfg.optim.lr * plan.lr_scale
    scheduler.base_lrs = [base] * len(scheduler.base_lrs)
    for group, lr_fn in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * lr_fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
