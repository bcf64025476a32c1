"""Performance optimizer: the memory budget, the micro-batch cap, and the measured probe.

`micro_batch: auto` -> the memory model's largest fit, then (when `probe` is on) a few real
steps at the longest sequence for doubling-then-bisected candidates, measuring the peak
(`torch.cuda.max_memory_allocated` on GPU, peak RSS growth on CPU). An OOM in the probe means
"too big", never a crash.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psutil

from elastic_ft.config import RunConfig
from elastic_ft.core.memory import estimate_memory, max_micro_batch, shape_from_config


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
    return estimate_memory(
        model_shape(cfg), cfg.method.kind, cfg.deepspeed.zero_stage, world, micro_batch,
        cfg.data.seq_len, cfg.train.precision, cfg.model.gradient_checkpointing,
        cfg.deepspeed.offload_optimizer, cfg.deepspeed.offload_params,
        cfg.model.attn_implementation)


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
        offload_params=cfg.deepspeed.offload_params, attn=cfg.model.attn_implementation)
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
    probed = run_probe(cfg, budget, limit=limit, use_gpu=use_gpu)
    chosen = max(1, min(probed["largest_fit"] or 1, limit))
    calibration = calibrate(cfg, probed["peaks"], use_gpu)
    events.emit("micro_batch_auto", modelled=modelled, probed=probed["largest_fit"],
                chosen=chosen, budget_bytes=budget, peaks=probed["peaks"],
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


class _RssPeak:
    """Peak RSS growth of this process while the block runs (CPU has no allocator counter)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.proc = psutil.Process()

    def __enter__(self) -> _RssPeak:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.base


def measure_peak(cfg: RunConfig, model: Any, micro_batch: int, steps: int = 2) -> int | None:
    """Peak bytes of `steps` full training steps at the longest sequence; None on OOM."""
    import torch

    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (micro_batch, cfg.data.seq_len), device=device)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(steps):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        with _RssPeak() as rss:
            for _ in range(steps):
                model(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        return rss.growth
    except (torch.OutOfMemoryError, MemoryError):
        return None
    except RuntimeError as error:
        if "out of memory" in str(error).lower():
            return None
        raise
    finally:
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()


def probe_micro_batch(cfg: RunConfig, budget_bytes: int, limit: int) -> dict[str, Any]:
    """Doubling then bisection over real steps; runs where it is called (a worker's device)."""
    import torch

    from elastic_ft.core.model import load_model

    model = load_model(cfg)
    if torch.cuda.is_available():
        model = model.cuda()
    model.train()
    peaks: dict[int, int | None] = {}

    def fits(m: int) -> bool:
        if m not in peaks:
            peaks[m] = measure_peak(cfg, model, m)
        return peaks[m] is not None and peaks[m] <= budget_bytes

    good, m = 0, 1
    while m <= limit and fits(m):
        good, m = m, m * 2
    lo, hi = good, min(m, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"largest_fit": lo, "peaks": {str(k): v for k, v in sorted(peaks.items())}}


def run_probe(cfg: RunConfig, budget_bytes: int, limit: int, use_gpu: bool) -> dict[str, Any]:
    """Run the probe as a Ray task with one worker's resources, so it measures that device."""
    import ray

    task = ray.remote(num_cpus=0.5, num_gpus=1 if use_gpu else 0, max_retries=0)(
        probe_micro_batch)
    return ray.get(task.remote(cfg, budget_bytes, limit))
