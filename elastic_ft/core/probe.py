"""The measured micro-batch probe: a few real DeepSpeed steps per candidate size.

Each candidate runs in its own single-process Ray task (`max_calls=1`): the model is loaded and
wrapped by the same `build_engine` the workers use, two steps run at the longest sequence, and
the peak is read (`torch.cuda.max_memory_allocated` on GPU, peak RSS growth on CPU). A fresh
process per candidate keeps one size's allocator cache and heap out of the next one's figure,
and an OOM - even one the OS answers by killing the process - costs only that task: it reads as
"too big", never a crash.

On GPU a size fits when the allocator's *reserved* peak is within the budget: fragmentation and
the caching allocator's slack are memory the device must really hold, so deciding on the
allocated figure alone can pick a size that then OOMs.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable
from typing import Any

from elastic_ft.config import RunConfig
from elastic_ft.core.peak_memory import CpuAllocatedPeak, RssPeak
from elastic_ft.core.ports import free_port


def local_process_group(rank: int = 0, world: int = 1, port: int | None = None) -> None:
    """Join (or, alone, form) a process group on this host; nothing when one exists."""
    import os

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if port is None:
        port = free_port()
    # DeepSpeed reads the launcher's variables even over an existing process group.
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    from elastic_ft.core.lean_imports import import_deepspeed

    deepspeed = import_deepspeed()
    # Wrapping the group now loads DeepSpeed's comm op outside the measured window.
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


def _is_oom(error: BaseException) -> bool:
    import torch

    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def measure_candidate(cfg: RunConfig, micro_batch: int, steps: int = 2,
                      cpu_allocations: bool = False) -> dict[str, int] | None:
    """Peak bytes of `steps` DeepSpeed steps at (micro_batch, seq_len); None when it OOMs.

    Returns {"peak_bytes", "reserved_bytes"}; on CPU both are the RSS growth, and with
    `cpu_allocations` "allocated_bytes" is the CPU tensors' peak (`CpuAllocatedPeak`).
    """
    from elastic_ft.core.lean_imports import import_deepspeed

    import_deepspeed()  # chooses its accelerator before torch work
    import peft  # noqa: F401  (module imports are not the step's memory)
    import torch
    import transformers  # noqa: F401

    from elastic_ft.core.engine import build_engine
    from elastic_ft.core.model import load_model
    from elastic_ft.resources.planning import WorkerPlan

    local_process_group()  # unless the caller already joined a group of several ranks
    world = torch.distributed.get_world_size()
    cuda = torch.cuda.is_available()
    plan = WorkerPlan(micro_batches=(micro_batch,) * world, grad_accum=1,
                      global_batch=micro_batch * world,
                      requested_global_batch=micro_batch * world, lr_scale=1.0, reason="probe")
    engine = None
    rss = RssPeak()
    allocations = CpuAllocatedPeak() if cpu_allocations and not cuda else contextlib.nullcontext()
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with rss, allocations:
            model = load_model(cfg)
            engine, _ = build_engine(cfg, model, plan, total_steps=steps, load_universal=False)
            vocab = engine.module.config.vocab_size
            ids = torch.randint(0, vocab, (micro_batch, cfg.data.seq_len), device=engine.device)
            for _ in range(steps):
                engine.backward(engine(input_ids=ids, labels=ids, use_cache=False).loss)
                engine.step()
                if isinstance(allocations, CpuAllocatedPeak):
                    allocations.end_step()
            if cuda:
                torch.cuda.synchronize()
        if cuda:
            return {"peak_bytes": int(torch.cuda.max_memory_allocated()),
                    "reserved_bytes": int(torch.cuda.max_memory_reserved())}
        measured = {"peak_bytes": rss.growth, "reserved_bytes": rss.growth}
        if isinstance(allocations, CpuAllocatedPeak):
            measured["allocated_bytes"] = allocations.peak
        return measured
    except Exception as error:  # an OOM is an answer here; anything else is not
        if _is_oom(error):
            return None
        raise
    finally:
        if engine is not None and hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def largest_passing(passes: Callable[[int], bool], limit: int, start: int = 1) -> int:
    """Largest m <= limit with passes(m), for a monotone test: doubling from `start`, then
    bisection (0 when nothing passes)."""
    good, m = 0, max(1, start)
    while m <= limit and passes(m):
        good, m = m, m * 2
    lo, hi = good, min(m, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if passes(mid) else (lo, mid)
    return lo


def probe_micro_batch(cfg: RunConfig, budget_bytes: int, limit: int, use_gpu: bool,
                      steps: int = 2, node_id: str | None = None) -> dict[str, Any]:
    """Largest micro-batch <= `limit` whose measured peak fits `budget_bytes`: doubling, then
    bisection. Every candidate is a fresh Ray task holding one worker's resources, on
    `node_id` when given (a node of the device type being probed)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0.5, num_gpus=1 if use_gpu else 0, max_retries=0,
                      max_calls=1)(measure_candidate)
    if node_id is not None:
        task = task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id,
                                                                               soft=False))
    measured: dict[int, dict[str, int] | None] = {}

    def fits(m: int) -> bool:
        if m not in measured:
            try:
                measured[m] = ray.get(task.remote(cfg, m, steps))
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError):
                measured[m] = None  # the OS or Ray's memory monitor killed it: too big
        result = measured[m]
        return result is not None and result["reserved_bytes"] <= budget_bytes

    return {"largest_fit": largest_passing(fits, limit),
            "peaks": {str(k): v and v["peak_bytes"] for k, v in sorted(measured.items())},
            "reserved": {str(k): v and v["reserved_bytes"] for k, v in sorted(measured.items())}}
