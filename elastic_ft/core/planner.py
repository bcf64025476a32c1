"""`elastic-ft plan`: per-worker memory for every combination, and one recommendation.

The recommendation follows Singh et al. 2024 ("A Study of Optimizations for Fine-tuning Large
Language Models"): ZeRO-2 + LoRA is the best default balance; ZeRO-3 + LoRA + gradient
checkpointing when the model is very large or the GPU small; full fine-tuning only when it fits
with room. Among what fits, prefer no offload (offload costs step time), then that order.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from elastic_ft.config import RunConfig
from elastic_ft.core.memory import GiB, estimate_memory, max_micro_batch
from elastic_ft.core.optimizer import model_shape
from elastic_ft.resources.policy import PlanError, plan_batches

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


def plan_table(cfg: RunConfig, gpus: int, gpu_mem_bytes: int) -> dict[str, Any]:
    shape = model_shape(cfg)
    budget = int(gpu_mem_bytes * cfg.train.mem_fraction)
    precision = "bf16" if cfg.train.precision == "fp32" else cfg.train.precision
    rows = []
    for method, stage, ckpt, offload in itertools.product(
            ("full", "lora", "qlora"), (0, 1, 2, 3), (False, True), (False, True)):
        if (offload and stage == 0) or (method == "qlora" and stage == 3):
            continue
        kwargs = dict(method=method, zero_stage=stage, world=gpus, seq_len=cfg.data.seq_len,
                      precision=precision, checkpointing=ckpt, offload_optimizer=offload,
                      offload_params=offload and stage == 3, attn=cfg.model.attn_implementation)
        est = estimate_memory(shape, micro_batch=1, **kwargs)
        fit = max_micro_batch(shape, budget, limit=cfg.train.global_batch, **kwargs)
        rows.append({"method": method, "zero_stage": stage, "gradient_checkpointing": ckpt,
                     "offload": offload, "per_worker_bytes_mb1": est.total_bytes,
                     "model_states_bytes": est.model_states_bytes,
                     "activations_bytes_mb1": est.activations_bytes,
                     "cpu_offload_bytes": est.cpu_offload_bytes, "fits": fit >= 1,
                     "max_micro_batch": fit})
    return {"model": cfg.model.name_or_path, "parameters": shape.total_params,
            "lora_parameters": shape.lora_params, "gpus": gpus, "gpu_mem_bytes": gpu_mem_bytes,
            "budget_bytes": budget, "precision": precision, "seq_len": cfg.data.seq_len,
            "global_batch": cfg.train.global_batch, "rows": rows,
            "recommendation": recommend(rows, cfg.train.global_batch, gpus)}


def recommend(rows: list[dict[str, Any]], global_batch: int, gpus: int) -> dict[str, Any] | None:
    for offload in (False, True):
        for method, stage, ckpt in PREFERENCE:
            for row in rows:
                if (row["method"], row["zero_stage"], row["gradient_checkpointing"],
                        row["offload"]) == (method, stage, ckpt, offload) and row["fits"]:
                    try:
                        batch = plan_batches(global_batch, gpus, row["max_micro_batch"])
                    except PlanError:
                        continue
                    return dict(row, micro_batch=batch.micro_batch, grad_accum=batch.grad_accum,
                                effective_global_batch=batch.global_batch)
    return None


def render_table(result: dict[str, Any]) -> str:
    head = (f"{result['model']}: {result['parameters'] / 1e9:.2f}B params, {result['gpus']} x "
            f"{result['gpu_mem_bytes'] / GiB:.0f} GiB, seq {result['seq_len']}, "
            f"{result['precision']}")
    lines = [head, f"{'method':<7}{'zero':>5}{'ckpt':>6}{'offl':>6}{'GiB@mb1':>10}"
                   f"{'states':>9}{'max mb':>8}  fits"]
    for r in result["rows"]:
        lines.append(f"{r['method']:<7}{r['zero_stage']:>5}{'y' if r['gradient_checkpointing'] else '-':>6}"
                     f"{'y' if r['offload'] else '-':>6}{r['per_worker_bytes_mb1'] / GiB:>10.1f}"
                     f"{r['model_states_bytes'] / GiB:>9.1f}{r['max_micro_batch']:>8}  "
                     f"{'yes' if r['fits'] else 'no'}")
    rec = result["recommendation"]
    lines.append("recommended: " + (
        f"{rec['method']} + ZeRO-{rec['zero_stage']}"
        f"{' + grad ckpt' if rec['gradient_checkpointing'] else ''}"
        f"{' + offload' if rec['offload'] else ''}, micro-batch {rec['micro_batch']} x accum "
        f"{rec['grad_accum']} x {result['gpus']} = {rec['effective_global_batch']}"
        if rec else "nothing fits; add GPUs or shorten seq_len"))
    return "\n".join(lines)
