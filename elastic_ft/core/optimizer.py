"""Performance optimizer: each rank's micro-batch cap from its own memory budget.

`micro_batch: auto` -> the measured probe (`elastic_ft.core.probe`: real DeepSpeed steps at the
longest sequence for doubling-then-bisected candidates), once per device type, on a node of
that type, calibrated against the memory model. A fixed micro-batch over a rank's cap is
lowered for that rank before any compute is spent (the controller's plan records it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from elastic_ft.config import RunConfig
from elastic_ft.core.memory import (
    EngineBuffers,
    estimate_memory,
    max_micro_batch,
    shape_from_config,
)
from elastic_ft.core.probe import probe_micro_batch


def model_shape(cfg: RunConfig):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model.name_or_path,
                                        trust_remote_code=cfg.model.trust_remote_code)
    lora = cfg.method.lora
    return shape_from_config(config, lora.r if cfg.method.kind != "full" else 0,
                             tuple(lora.target_modules))


def memory_method(cfg: RunConfig) -> str:
    """The memory model's method: LOMO is full fine-tuning with another memory picture."""
    return "lomo" if cfg.optim.name == "lomo" else cfg.method.kind


def estimate_for(cfg: RunConfig, world: int, micro_batch: int, use_gpu: bool = True):
    shape = model_shape(cfg)
    return estimate_memory(
        shape, memory_method(cfg), cfg.deepspeed.zero_stage, world, micro_batch,
        cfg.data.seq_len, cfg.train.precision, cfg.model.gradient_checkpointing,
        cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params,
        cfg.model.attn_implementation, EngineBuffers.for_shape(shape, use_gpu))


def estimator_settings(cfg: RunConfig, use_gpu: bool) -> dict[str, Any]:
    """The memory model's settings for this run's workers (all but budget and micro-batch).
    The smallest world size is assumed: ZeRO's shards are largest there."""
    shape = model_shape(cfg)
    return dict(method=memory_method(cfg), zero_stage=cfg.deepspeed.zero_stage,
                world=cfg.workers.min, seq_len=cfg.data.seq_len, precision=cfg.train.precision,
                checkpointing=cfg.model.gradient_checkpointing,
                offload_optimizer=cfg.deepspeed.offload_optimizer,
                offload_params=cfg.deepspeed.offload_params, attn=cfg.model.attn_implementation,
                buffers=EngineBuffers.for_shape(shape, use_gpu))


@dataclass
class MicroBatchCaps:
    """Each rank's micro-batch cap from its own memory budget.

    A probed device type (`micro_batch: auto`) is capped by its measured peaks: the largest
    probed size whose reserved peak fits the rank's budget. Any other type by the memory
    model. A fixed `train.micro_batch` is the most any rank gets.
    """

    shape: Any
    settings: dict[str, Any]
    limit: int  # the global batch: no micro-batch is larger
    requested: int | None = None  # a fixed train.micro_batch
    probed: dict[str, dict[int, int | None]] = field(default_factory=dict)  # type -> m -> bytes

    def modelled(self, budget_bytes: int) -> int:
        return max_micro_batch(self.shape, budget_bytes, limit=self.limit, **self.settings)

    def cap(self, device_type: str, budget_bytes: int) -> tuple[int, str]:
        """(cap, where it came from); 0 when not even a micro-batch of 1 fits."""
        if device_type in self.probed:
            fits = [m for m, peak in self.probed[device_type].items()
                    if peak is not None and peak <= budget_bytes]
            cap, source = (max(fits) if fits else 0), "probe"
        else:
            cap, source = self.modelled(budget_bytes), "memory model"
        if self.requested is not None:
            cap = min(cap, self.requested)
        return min(cap, self.limit), source


def resolve_caps(cfg: RunConfig, use_gpu: bool, budgets_by_type: dict[str, tuple[int, str]],
                 events: Any) -> MicroBatchCaps:
    """The caps the controller plans with. `budgets_by_type`: each device type among the nodes
    that can host a worker -> (largest per-rank budget of that type, a node of that type).
    `micro_batch: auto` probes once per type, on a node of that type, at that budget; every
    node of that type reuses the measured peaks against its own budget."""
    caps = MicroBatchCaps(model_shape(cfg), estimator_settings(cfg, use_gpu),
                          cfg.train.global_batch)
    if cfg.train.micro_batch != "auto":
        caps.requested = int(cfg.train.micro_batch)
        return caps
    for device_type, (budget, node_id) in sorted(budgets_by_type.items()):
        probed = probe_micro_batch(cfg, budget, limit=caps.limit, use_gpu=use_gpu,
                                   node_id=node_id)
        caps.probed[device_type] = {int(m): v for m, v in probed["reserved"].items()}
        chosen = max(1, min(probed["largest_fit"] or 1, caps.limit))
        events.emit("micro_batch_auto", device_type=device_type, node_id=node_id,
                    modelled=caps.modelled(budget), probed=probed["largest_fit"],
                    chosen=chosen, budget_bytes=budget, peaks=probed["peaks"],
                    reserved=probed["reserved"],
                    calibration=calibrate(cfg, probed["peaks"], use_gpu))
    return caps


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
