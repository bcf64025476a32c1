"""What a worker is and holds: where it runs, its memory peaks, the CUDA-cap drill."""

from __future__ import annotations

import os
import resource
from typing import Any


def peak_mem_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def training_mem_bytes(baseline_bytes: int) -> int:
    """Memory the training itself holds: the CUDA allocator's peak, or on CPU the peak RSS
    above the process's footprint before the model was built (the memory model's unit)."""
    import torch

    if torch.cuda.is_available():
        return peak_mem_bytes()
    return max(0, peak_mem_bytes() - baseline_bytes)


def hold_to_cuda_cap() -> None:
    """`ELASTIC_FT_CUDA_MEM_CAP_BYTES` holds each worker to that much of its GPU without the
    planner knowing: a drill for a smaller card or a co-tenant, which makes a real
    `torch.OutOfMemoryError` happen mid-run so the recovery path can be watched."""
    import torch

    cap = os.environ.get("ELASTIC_FT_CUDA_MEM_CAP_BYTES")
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, int(cap) / total))


def rank_place() -> dict[str, Any]:
    """Where this rank runs, for its plan: node, GPU ids, its own device's total memory (and
    its node's RAM and budget override, should the node's monitor not have reported yet)."""
    import psutil
    import ray
    import torch

    from elastic_ft.resources.inventory import NODE_BUDGET_ENV
    from elastic_ft.resources.worker_setup import warm_times

    ctx = ray.get_runtime_context()
    cuda_total = (torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
                  if torch.cuda.is_available() else None)
    override = os.environ.get(NODE_BUDGET_ENV)
    return {"node_id": ctx.get_node_id(), "gpu_ids": list(ctx.get_accelerator_ids().get(
        "GPU", [])), "cuda_total_bytes": cuda_total, "pid": os.getpid(),
        "node_mem_bytes": int(psutil.virtual_memory().total),
        "budget_override_bytes": int(override) if override else None,
        # the controller starts warm spares with this exact environment (warm_pool.py)
        "runtime_env": ctx.get_runtime_env_string(),
        # a spare: when its imports started and were done (None: not a spare)
        "process_started_t": process_started_t(), "warm_times": warm_times()}


def process_started_t() -> float:
    """When this worker process started (Ray may hand a group a process it started before:
    a warm spare, resources/warm_pool.py). On Linux from its start tick and the uptime: psutil's
    `create_time` adds the tick to /proc/stat's boot time, whole seconds, so up to 1 s early."""
    import time

    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime_s = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        import psutil

        return psutil.Process().create_time()
    return time.time() - uptime_s + start_ticks / os.sysconf("SC_CLK_TCK")
