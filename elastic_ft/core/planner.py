"""`elastic-ft plan`: per-worker memory for every combination, and one recommendation.

The recommendation follows Singh et al. 2024 ("A Study of Optimizations for Fine-tuning Large
Language Models"): ZeRO-2 + LoRA is the best default balance; ZeRO-3 + LoRA + gradient
checkpointing when the model is very large or the GPU small; full fine-tuning only when it fits
with room. Among what fits, prefer no offload (offload costs step time), then that order.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from elastic_ft.bench.flops import datasheet_peak
from elastic_ft.config import RunConfig
from elastic_ft.core.memory import GiB, estimate_memory, max_micro_batch
from elastic_ft.core.optimizer import model_shape
from elastic_ft.resources.planning import PlanError, plan_per_worker

UNITS = {"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
         "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
# Preference order among fitting options (first wins), per the study above.
PREFERENCE = [("lora", 2, False), ("lora", 2, True), ("lora", 3, True), ("qlora", 2, False),
              ("qlora", 2, True), ("full", 2, False), ("full", 3, True), ("lora", 1, False),
              ("lora", 3, False), ("full", 3, False), ("full", 1, False), ("lora", 0, False),
              ("full", 0, False), ("qlora", 0, False)]


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 24GiB or 80GB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class DeviceGroup:
    count: int
    name: str
    mem_bytes: int


def parse_inventory(text: str, gpu_mem: str = "80GiB") -> list[DeviceGroup]:
    """`8` (with `gpu_mem`) or `4xA100-80GB,4xL4-24GB`: a GPU's memory is read off the end of
    its name, and "GB" there means GiB, as in NVIDIA's names (an A100-80GB holds 80 GiB)."""
    if text.strip().isdigit():
        return [DeviceGroup(int(text), "gpu", parse_bytes(gpu_mem))]
    groups = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(.+?)-([0-9.]+)\s*(GB|GiB|G)\s*", part)
        if not match:
            raise ValueError(f"cannot read {part!r} as COUNTxNAME-MEM (e.g. 4xA100-80GB); "
                             "separate device types with commas")
        count, name, size = int(match.group(1)), match.group(2), match.group(3)
        groups.append(DeviceGroup(count, name, parse_bytes(f"{size}GiB")))
    return groups


def plan_table(cfg: RunConfig, devices: list[DeviceGroup]) -> dict[str, Any]:
    shape = model_shape(cfg)
    world = sum(g.count for g in devices)
    precision = "bf16" if cfg.train.precision == "fp32" else cfg.train.precision
    rows = []
    for method, stage, ckpt, offload in itertools.product(
            ("full", "lora", "qlora", "lomo"), (0, 1, 2, 3), (False, True), (False, True)):
        if ((offload and stage == 0) or (method == "qlora" and stage == 3)
                or (method == "lomo" and stage != 0)):  # LOMO runs without DeepSpeed
            continue
        kwargs = dict(method=method, zero_stage=stage, world=world, seq_len=cfg.data.seq_len,
                      precision=precision, checkpointing=ckpt, offload_optimizer=offload,
                      offload_params=offload and stage == 3, attn=cfg.model.attn_implementation)
        est = estimate_memory(shape, micro_batch=1, **kwargs)
        fit_by_device = {g.name: max_micro_batch(shape, int(g.mem_bytes * cfg.train.mem_fraction),
                                                 limit=cfg.train.global_batch, **kwargs)
                         for g in devices}
        rows.append({"method": method, "zero_stage": stage, "gradient_checkpointing": ckpt,
                     "offload": offload, "per_worker_bytes_mb1": est.total_bytes,
                     "model_states_bytes": est.model_states_bytes,
                     "activations_bytes_mb1": est.activations_bytes,
                     "cpu_offload_bytes": est.cpu_offload_bytes,
                     "fits": min(fit_by_device.values()) >= 1,
                     "max_micro_batch": min(fit_by_device.values()),
                     "max_micro_batch_by_device": fit_by_device})
    return {"model": cfg.model.name_or_path, "parameters": shape.total_params,
            "lora_parameters": shape.lora_params, "gpus": world,
            "devices": [{"count": g.count, "name": g.name, "mem_bytes": g.mem_bytes}
                        for g in devices],
            "gpu_mem_bytes": min(g.mem_bytes for g in devices),
            "budget_bytes": int(min(g.mem_bytes for g in devices) * cfg.train.mem_fraction),
            "precision": precision, "seq_len": cfg.data.seq_len,
            "global_batch": cfg.train.global_batch, "rows": rows,
            "recommendation": recommend(rows, cfg.train.global_batch, devices)}


def recommend(rows: list[dict[str, Any]], global_batch: int,
              devices: list[DeviceGroup]) -> dict[str, Any] | None:
    """The first preferred combination that fits every device; each worker's micro-batch
    from its device's cap, the split by datasheet peak FLOPs where the names are known (the
    run then rebalances on measured speed)."""
    workers = [g for g in devices for _ in range(g.count)]
    peaks = [datasheet_peak(g.name) for g in workers]
    weights = [p.flops_per_s for p in peaks] if all(peaks) and len(devices) > 1 else None
    for offload in (False, True):
        for method, stage, ckpt in PREFERENCE:
            for row in rows:
                if (row["method"], row["zero_stage"], row["gradient_checkpointing"],
                        row["offload"]) == (method, stage, ckpt, offload) and row["fits"]:
                    caps = [row["max_micro_batch_by_device"][g.name] for g in workers]
                    try:
                        batch = plan_per_worker(caps, global_batch, weights)
                    except PlanError:
                        continue
                    shares = [{"device": g.name, "micro_batch": m,
                               "samples": m * batch.grad_accum}
                              for g, m in zip(workers, batch.micro_batches, strict=True)]
                    return dict(row, micro_batch=max(batch.micro_batches),
                                micro_batches=list(batch.micro_batches),
                                grad_accum=batch.grad_accum,
                                effective_global_batch=batch.global_batch, workers=shares,
                                split_by=("datasheet peak FLOPs" if weights else "memory"))
    return None


def render_table(result: dict[str, Any]) -> str:
    gib = GiB
    devices = ", ".join(f"{d['count']} x {d['name']} {d['mem_bytes'] / gib:.0f} GiB"
                        for d in result["devices"])
    head = (f"{result['model']}: {result['parameters'] / 1e9:.2f}B params, {devices}, "
            f"seq {result['seq_len']}, {result['precision']}")
    lines = [head, f"{'method':<7}{'zero':>5}{'ckpt':>6}{'offl':>6}{'GiB@mb1':>10}"
                   f"{'states':>9}{'max mb':>8}  fits"]
    for r in result["rows"]:
        lines.append(f"{r['method']:<7}{r['zero_stage']:>5}{'y' if r['gradient_checkpointing'] else '-':>6}"
                     f"{'y' if r['offload'] else '-':>6}{r['per_worker_bytes_mb1'] / gib:>10.1f}"
                     f"{r['model_states_bytes'] / gib:>9.1f}{r['max_micro_batch']:>8}  "
                     f"{'yes' if r['fits'] else 'no'}")
    rec = result["recommendation"]
    if rec is None:
        lines.append("recommended: nothing fits; add GPUs or shorten seq_len")
        return "\n".join(lines)
    lines.append(
        f"recommended: {rec['method']} + ZeRO-{rec['zero_stage']}"
        f"{' + grad ckpt' if rec['gradient_checkpointing'] else ''}"
        f"{' + offload' if rec['offload'] else ''}, accumulation {rec['grad_accum']}, "
        f"global batch {rec['effective_global_batch']}")
    lines.append(f"each worker's share (split by {rec['split_by']}; the run rebalances on "
                 "measured speed):")
    shown: dict[tuple[str, int], int] = {}
    for w in rec["workers"]:
        shown[(w["device"], w["micro_batch"])] = shown.get((w["device"], w["micro_batch"]), 0) + 1
    for (device, m), n in shown.items():
        lines.append(f"  {n} x {device:<16} micro-batch {m:>4} x accum {rec['grad_accum']} = "
                     f"{m * rec['grad_accum']} samples per step each")
    return "\n".join(lines)
