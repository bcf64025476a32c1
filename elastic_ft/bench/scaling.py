"""`elastic-ft bench scaling`: tokens/s, efficiency and MFU per worker count, as Ray Tune trials.

Each worker count is one Tune trial (run one at a time, so trials never share cores) that
runs the real recipe (`run_training`) for a few steps. Strong scaling keeps the global batch;
weak scaling grows it with the workers (same per-worker batch). Throughput is wall clock over
the steps after `warmup_steps` (checkpoints, reports and data waits included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from elastic_ft.bench.flops import datasheet_peak, flops_per_token, measure_matmul_peak, mfu
from elastic_ft.bench.hardware import hardware_record
from elastic_ft.config import RunConfig


def _trial(config: dict[str, Any]) -> None:
    from ray import tune

    from elastic_ft.core.trainer import run_training

    cfg = RunConfig.model_validate(config["run"])
    workers, mode = config["workers"], config["mode"]
    base = cfg.train.global_batch
    global_batch = base * workers if mode == "weak" else base
    cfg = cfg.model_copy(update={
        "output_dir": str(Path(config["out_dir"]) / f"{mode}-w{workers}"),
        "storage_path": None,
        "train": cfg.train.model_copy(update={"max_steps": config["steps"],
                                               "global_batch": global_batch}),
        "workers": cfg.workers.model_copy(update={"min": workers, "max": workers}),
        "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": config["steps"]}),
    })
    _reuse_prepared_data(Path(config["out_dir"]) / "data", Path(cfg.output_dir))
    run_training(cfg, export=False)
    rows = [json.loads(x) for x in
            (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > config["warmup_steps"]]
    span_s = timed[-1]["t"] - timed[0]["t"] + timed[0]["step_s"]
    tokens = sum(r["trained_real_tokens"] for r in timed)
    tune.report({"tokens_per_s": tokens / span_s, "median_step_s": sorted(
        r["step_s"] for r in timed)[len(timed) // 2], "global_batch": global_batch,
        "steps_timed": len(timed), "peak_mem_bytes": max(r["peak_mem_bytes"] for r in rows)})


def _reuse_prepared_data(source: Path, out: Path) -> None:
    """Every trial trains on the same prepared blocks; its fingerprint makes them a cache hit."""
    import shutil

    if out.exists():  # a trial measures a fresh run: never resume an earlier one's checkpoint
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(source / "prepared", out / "prepared")
    for name in ("data_report.json", "quarantine.jsonl"):
        if (source / name).exists():
            shutil.copy2(source / name, out / name)


def run_scaling(cfg: RunConfig, worker_counts: list[int], out_dir: Path, steps: int = 10,
                warmup_steps: int = 2, modes: tuple[str, ...] = ("strong", "weak")
                ) -> dict[str, Any]:
    import ray
    from ray import tune

    from elastic_ft.core.optimizer import model_shape
    from elastic_ft.core.trainer import ensure_ray

    if steps <= warmup_steps:
        raise ValueError(f"steps ({steps}) must exceed warmup_steps ({warmup_steps})")
    cfg = cfg.with_absolute_paths()
    out_dir = out_dir.resolve()
    # the Tune trial holds 0.01 CPU: one spare logical CPU keeps it from starving the
    # workers when Ray is started here (the 2-core trap)
    started = ensure_ray(num_cpus=(os.cpu_count() or 1) + 1)
    try:
        hardware = hardware_record()
        from elastic_ft.core.model import tokenizer_path
        from elastic_ft.data.pipeline import prepare_data

        prepare_data(cfg.data, tokenizer_path(cfg), out_dir / "data", engine="ray",
                     trust_remote_code=cfg.model.trust_remote_code)
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
        tuner = tune.Tuner(
            tune.with_resources(_trial, {"cpu": 0.01}),  # the trial only drives the run
            param_space={"run": cfg.to_dict(), "out_dir": str(out_dir), "steps": steps,
                         "warmup_steps": warmup_steps, "workers": tune.grid_search(worker_counts),
                         "mode": tune.grid_search(list(modes))},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(name="bench_scaling", storage_path=str(out_dir / "tune"),
                                      verbose=0))
        results = tuner.fit()
        errors = [str(r.error) for r in results if r.error]
        if errors:
            raise RuntimeError(f"benchmark trials failed: {errors[:2]}")
    finally:
        if started:
            ray.shutdown()
    peak = _peak(hardware, use_gpu)
    per_token = flops_per_token(model_shape(cfg), cfg.data.seq_len, cfg.method.kind)
    rows = []
    for result in results:
        c, m = result.config, result.metrics
        rows.append({"mode": c["mode"], "workers": c["workers"], "global_batch": m["global_batch"],
                     "tokens_per_s": m["tokens_per_s"],
                     "tokens_per_s_per_worker": m["tokens_per_s"] / c["workers"],
                     "median_step_s": m["median_step_s"], "peak_mem_bytes": m["peak_mem_bytes"],
                     "mfu": mfu(m["tokens_per_s"], per_token, peak.flops_per_s, c["workers"])})
    add_efficiency(rows)
    return {"benchmark": "scaling", "hardware": hardware, "model": cfg.model.name_or_path,
            "method": cfg.method.kind, "zero_stage": cfg.deepspeed.zero_stage,
            "seq_len": cfg.data.seq_len, "steps": steps, "warmup_steps": warmup_steps,
            "flops_per_token": per_token, "peak_flops_per_s": peak.flops_per_s,
            "peak_source": peak.source, "rows": sorted(rows, key=lambda r: (r["mode"],
                                                                            r["workers"]))}


def add_efficiency(rows: list[dict[str, Any]]) -> None:
    """Strong: T(W) / (W x T(1)) at a fixed global batch. Weak: per-worker T(W) / T(1)."""
    for mode in {r["mode"] for r in rows}:
        sel = [r for r in rows if r["mode"] == mode]
        base = min(sel, key=lambda r: r["workers"])
        for r in sel:
            per_worker_base = base["tokens_per_s"] / base["workers"]
            r["efficiency"] = (r["tokens_per_s"] / r["workers"]) / per_worker_base


def _peak(hardware: dict[str, Any], use_gpu: bool):
    if use_gpu and hardware["gpus"]:
        peak = datasheet_peak(hardware["gpus"][0]["name"])
        if peak is not None:
            return peak
        return measure_matmul_peak(8192, device="cuda", dtype_name="bfloat16")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray gives each CPU worker one core (OMP_NUM_THREADS=1)
    try:
        return measure_matmul_peak(512, repeats=20)
    finally:
        torch.set_num_threads(threads)
