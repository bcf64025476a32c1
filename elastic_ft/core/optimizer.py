"""Performance optimizer: the memory budget, the micro-batch cap, and the measured probe.

`micro_batch: auto` -> the measured probe (`elastic_ft.core.probe`: real DeepSpeed steps at the
longest sequence for doubling-then-bisected candidates), calibrated against the memory model.
A fixed micro-batch over the memory model's cap is lowered before any compute is spent.
"""

from __future__ import annotations

from typing import Any

import psutil

from elastic_ft.config import RunConfig
from elastic_ft.core.memory import (
    EngineBuffers,
    estimate_memory,
    max_micro_batch,
    shape_from_config,
)
from elastic_ft.core.probe import probe_micro_batch


def device_budget_bytes(cfg: RunConfig, use_gpu: bool) -> int:
    if cfg.train.mem_cap_bytes:
        return cfg.train.mem_cap_bytes
    if use_gpu:
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
        else:  # the driver may sit on a CPU head node: ask NVML there, else assume 24 GiB
            total = 24 * 1024**3
        return int(total * cfg.train.mem_fraction)
    return int(psutil.virtual_memory().total * cfg.train.mem_fraction / max(1, cfg.workers.max))


def model_shape(cfg: RunConfig):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model.name_or_path,
                                        trust_remote_code=cfg.model.trust_remote_code)
    lora = cfg.method.lora
    return shape_from_config(config, lora.r if cfg.method.kind != "full" else 0,
                             tuple(lora.target_modules))


def estimate_for(cfg: RunConfig, world: int, micro_batch: int, use_gpu: bool = True):
    shape = model_shape(cfg)
    return estimate_memory(
        shape, cfg.method.kind, cfg.deepspeed.zero_stage, world, micro_batch,
        cfg.data.seq_len, cfg.train.precision, cfg.model.gradient_checkpointing,
        cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params,
        cfg.model.attn_implementation, EngineBuffers.for_shape(shape, use_gpu))


def resolve_max_micro_batch(cfg: RunConfig, use_gpu: bool, events: Any) -> tuple[int, int]:
    """(micro-batch cap, memory budget bytes) for the controller's plans."""
    budget = device_budget_bytes(cfg, use_gpu)
    limit = cfg.train.global_batch
    shape = model_shape(cfg)
    modelled = max_micro_batch(
        shape, budget, limit=limit, method=cfg.method.kind, zero_stage=cfg.deepspeed.zero_stage,
        world=cfg.workers.min, seq_len=cfg.data.seq_len, precision=cfg.train.precision,
        checkpointing=cfg.model.gradient_checkpointing,
        offload_optimizer=cfg.deepspeed.offload_optimizer,
        offload_params=cfg.deepspeed.offload_params, attn=cfg.model.attn_implementation,
        buffers=EngineBuffers.for_shape(shape, use_gpu))
    if cfg.train.micro_batch != "auto":
        requested = int(cfg.train.micro_batch)
        if modelled >= requested:
            return requested, budget
        # Over the cap: re-plan with the largest micro-batch the model says fits (more
        # accumulation keeps the global batch); never start a run that is planned to OOM.
        chosen = max(1, modelled)
        events.emit("micro_batch_capped", requested=requested, chosen=chosen,
                    budget_bytes=budget)
        return chosen, budget
    probed = probe_micro_batch(cfg, budget, limit=limit, use_gpu=use_gpu)
    chosen = max(1, min(probed["largest_fit"] or 1, limit))
    calibration = calibrate(cfg, probed["peaks"], use_gpu)
    events.emit("micro_batch_auto", modelled=modelled, probed=probed["largest_fit"],
                chosen=chosen, budget_bytes=budget, peaks=probed["peaks"],
                reserved=probed["reserved"],
                calibration=calibration)
    return chosen, budget


def calibrate(cfg: RunConfig, peaks: dict[str, int | None], use_gpu: bool) -> dict[str, Any]:
    """Measured / modelled peak at each probed size: the factor the model is off by here.

    The median ratio is reported (and could scale later estimates); on CPU the measure is
    RSS growth, which includes allocator slack the GPU model does not have.
    """
    ratios = {}
    for m, measured in peaks.items():
        if measured:
            modelled = estimate_for(cfg, cfg.workers.min, int(m), use_gpu).total_bytes
            ratios[m] = round(measured / max(1, modelled), 3)
    values = sorted(ratios.values())
    return {"ratios": ratios, "median": values[len(values) // 2] if values else None}
