"""`elastic-ft bench matrix`: peak memory and step time across the optimisation choices studied
by Singh et al. 2024 ("A Study of Optimizations for Fine-tuning Large Language Models").

Cells cross gradient checkpointing x LoRA/full x ZeRO 1/2/3 x attention implementation, each a
Ray Tune trial running the real recipe (`train` under Ray Train) at `workers` workers; plus
LOMO cells (`optim.name: lomo`: full fine-tuning with the fused SGD-style update, no optimizer
state, no DeepSpeed) to compare with full AdamW at ZeRO-0 (`--zero 0`).
Memory is per worker: the CUDA allocator's peak, or on CPU the peak RSS above the process's
footprint before the model was built.
"""

from __future__ import annotations

import itertools
import os
import statistics
from pathlib import Path
from typing import Any

from elastic_ft.config import RunConfig


def _cell_config(cfg: RunConfig, cell: dict[str, Any], out: Path, steps: int) -> RunConfig:
    return cfg.model_copy(update={
        "output_dir": str(out), "storage_path": None,
        "model": cfg.model.model_copy(update={"gradient_checkpointing": cell["ckpt"],
                                               "attn_implementation": cell["attn"]}),
        "method": cfg.method.model_copy(update={"kind": "full" if cell["method"] == "lomo"
                                                 else cell["method"]}),
        "optim": cfg.optim.model_copy(update={"name": "lomo"}) if cell["method"] == "lomo"
        else cfg.optim,
        "deepspeed": cfg.deepspeed.model_copy(update={"zero_stage": cell["zero"] or 0}),
        "train": cfg.train.model_copy(update={"max_steps": steps}),
        "workers": cfg.workers.model_copy(update={"min": cell["workers"],
                                                   "max": cell["workers"]}),
        "checkpoint": cfg.checkpoint.model_copy(update={"every_steps": steps})})


def _train_cell(cfg: RunConfig) -> dict[str, Any]:
    from elastic_ft.bench.scaling import _reuse_prepared_data
    from elastic_ft.core.trainer import run_training
    from elastic_ft.events import read_events

    out = Path(cfg.output_dir)
    _reuse_prepared_data(out.parent / "data", out)
    run_training(cfg, export=False)
    rows = read_events(out / "metrics.jsonl")
    return {"peak_mem_bytes": max(r["train_mem_bytes"] for r in rows),
            "median_step_s": statistics.median(r["step_s"] for r in rows[1:])}


def _trial(config: dict[str, Any]) -> None:
    from ray import tune

    cell = config["cell"]
    cfg = _cell_config(RunConfig.model_validate(config["run"]), cell,
                       Path(config["out_dir"]) / cell["name"], config["steps"])
    tune.report(_train_cell(cfg))


def matrix_cells(methods: list[str], zero_stages: list[int], ckpt: list[bool], attn: list[str],
                 workers: int, lomo: bool) -> list[dict[str, Any]]:
    cells = [{"method": m, "zero": z, "ckpt": c, "attn": a, "workers": workers}
             for m, z, c, a in itertools.product(methods, zero_stages, ckpt, attn)]
    if lomo:
        cells += [{"method": "lomo", "zero": 0, "ckpt": c, "attn": a, "workers": workers}
                  for c, a in itertools.product(ckpt, attn)]
    for cell in cells:
        cell["name"] = (f"{cell['method']}-z{cell['zero']}-{'ckpt' if cell['ckpt'] else 'nockpt'}"
                        f"-{cell['attn']}")
    return cells


def run_matrix(cfg: RunConfig, cells: list[dict[str, Any]], out_dir: Path, steps: int = 6
               ) -> dict[str, Any]:
    import ray
    from ray import tune

    from elastic_ft.bench.hardware import hardware_record
    from elastic_ft.core.model import tokenizer_path
    from elastic_ft.core.trainer import ensure_ray
    from elastic_ft.data.pipeline import prepare_data

    cfg = cfg.with_absolute_paths()
    out_dir = out_dir.resolve()
    # the Tune trial holds 0.01 CPU: one spare logical CPU keeps it from starving the
    # workers when Ray is started here (the 2-core trap)
    started = ensure_ray(num_cpus=(os.cpu_count() or 1) + 1)
    try:
        prepare_data(cfg.data, tokenizer_path(cfg), out_dir / "data")
        results = tune.Tuner(
            tune.with_resources(_trial, {"cpu": 0.01}),
            param_space={"run": cfg.to_dict(), "out_dir": str(out_dir), "steps": steps,
                         "cell": tune.grid_search(cells)},
            tune_config=tune.TuneConfig(max_concurrent_trials=1),
            run_config=tune.RunConfig(name="bench_matrix", storage_path=str(out_dir / "tune"),
                                      verbose=0)).fit()
        hardware = hardware_record()
    finally:
        if started:
            ray.shutdown()
    rows = []
    for result in results:
        row = dict(result.config["cell"])
        if result.error:
            row["error"] = str(result.error).splitlines()[0][:300]
        else:
            row.update({k: result.metrics[k] for k in ("peak_mem_bytes", "median_step_s")})
        rows.append(row)
    return {"benchmark": "matrix", "hardware": hardware, "steps": steps,
            "seq_len": cfg.data.seq_len, "micro_batch": cfg.train.micro_batch,
            "rows": sorted(rows, key=lambda r: r["name"])}


def matrix_markdown(result: dict[str, Any]) -> str:
    lines = ["| method | ZeRO | grad ckpt | attention | workers | peak mem/worker (MiB) | "
             "step (s) |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mem = f"{r['peak_mem_bytes'] / 2**20:.1f}" if "peak_mem_bytes" in r else "error"
        step = f"{r['median_step_s']:.3f}" if "median_step_s" in r else r.get("error", "")
        lines.append(f"| {r['method']} | {r['zero'] if r['zero'] is not None else '-'} | "
                     f"{'on' if r['ckpt'] else 'off'} | {r['attn']} | {r['workers']} | {mem} | "
                     f"{step} |")
    return "\n".join(lines) + "\n"


def matrix_plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "peak_mem_bytes" in r]
    names = [r["name"] for r in rows]
    fig, (ax_mem, ax_time) = plt.subplots(2, 1, figsize=(max(6, len(rows) * 0.5), 7),
                                          sharex=True)
    ax_mem.bar(names, [r["peak_mem_bytes"] / 2**20 for r in rows])
    ax_mem.set(ylabel="peak MiB / worker", title="memory and step time per cell")
    ax_time.bar(names, [r["median_step_s"] for r in rows], color="tab:orange")
    ax_time.set(ylabel="median step (s)")
    ax_time.tick_params(axis="x", rotation=75, labelsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_matrix(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    from elastic_ft.bench.report import write_result

    return write_result(result, out_dir, "matrix", matrix_markdown, matrix_plot)
