"""Predicted vs measured peak memory per worker, and the probe against the largest real fit.

Part 1 (accuracy): every cell runs the real worker path - `load_model` + `build_engine`
(DeepSpeed ZeRO 0-3, world size 1; on CPU also ZeRO 1-3 over `--world` gloo ranks) - for two
steps at (micro_batch, seq_len) in a fresh process (`elastic_ft.core.probe.measure_candidate`,
the probe's own measurement), and compares the peak with `estimate_memory`. GPU:
`torch.cuda.max_memory_allocated`. CPU: the peak of live CPU tensor bytes (`CpuAllocatedPeak`,
the same quantity), RSS growth alongside. bf16 on both, so DeepSpeed takes the same optimizer
paths as on a GPU.

Part 2 (probe, GPU only): for each (method, budget), the probe's pick against the largest
micro-batch that really trains when the process is held to the budget by
`torch.cuda.set_per_process_memory_fraction` (found by bisection above the pick).

    python benchmarks/memory_accuracy.py --model assets/tiny/model --model assets/medium/model
Writes benchmarks/results/<hardware>/memory_accuracy.json and .md.

    python benchmarks/memory_accuracy.py --rescore RESULT.json --model PATH --bucket 5e8
re-predicts the cells of an earlier result (measured with DeepSpeed's default 5e8-element
bucket) with today's model, and writes RESULT_rescored.json/.md beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3


def cell_config(model: str, method: str, zero: int, ckpt: bool, seq: int, precision: str,
                mem_cap_bytes: int | None = None):
    from elastic_ft.config import load_config

    return load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": model, "model.gradient_checkpointing": ckpt,
        "method.kind": method, "method.lora.target_modules": ["q_proj", "v_proj"],
        "deepspeed.zero_stage": zero, "data.seq_len": seq, "train.precision": precision,
        "train.mem_cap_bytes": mem_cap_bytes, "workers.min": 1, "workers.max": 1})


def measure_under_cap(cfg: Any, micro_batch: int, cap_bytes: int) -> bool:
    """True when 3 real steps train with the process held to `cap_bytes` of the GPU."""
    import torch

    from elastic_ft.core.probe import measure_candidate

    torch.cuda.set_per_process_memory_fraction(
        cap_bytes / torch.cuda.get_device_properties(0).total_memory)
    return measure_candidate(cfg, micro_batch, steps=3) is not None


def accuracy(models: list[str], micros: list[int], zeros: list[int], methods: list[str],
             seq: int, precision: str, gpu_share: float) -> list[dict[str, Any]]:
    import ray

    from elastic_ft.core.optimizer import estimate_for
    from elastic_ft.core.probe import measure_candidate

    cuda = gpu_share > 0
    task = ray.remote(num_cpus=1, num_gpus=gpu_share, max_retries=0, max_calls=1)(
        measure_candidate)
    cells = list(itertools.product(models, methods, zeros, (False, True), micros))
    configs = [cell_config(mdl, method, zero, ckpt, seq, precision)
               for mdl, method, zero, ckpt, _ in cells]
    refs = [task.remote(cfg, m, 2, not cuda) for cfg, (*_, m) in zip(configs, cells, strict=True)]
    rows = []
    for cfg, (mdl, method, zero, ckpt, m), ref in zip(configs, cells, refs, strict=True):
        measured = ray.get(ref)
        est = estimate_for(cfg, 1, m, cuda)
        peak = measured and measured["allocated_bytes" if not cuda else "peak_bytes"]
        rows.append({"model": Path(mdl).parent.name, "method": method, "zero_stage": zero,
                     "checkpointing": ckpt, "micro_batch": m, "seq_len": seq,
                     "predicted_bytes": est.total_bytes, "measured_bytes": peak,
                     "reserved_bytes": measured and measured["reserved_bytes"],
                     "error": None if not peak else (est.total_bytes - peak) / peak,
                     "parts": est.to_dict()})
        print(json.dumps({k: rows[-1][k] for k in (
            "model", "method", "zero_stage", "checkpointing", "micro_batch", "predicted_bytes",
            "measured_bytes", "error")}), flush=True)
    return rows


def measure_rank(cfg: Any, micro_batch: int, rank: int, world: int, port: int) -> int:
    """One rank of a CPU group of `world` processes: its peak live tensor bytes."""
    from elastic_ft.core.probe import local_process_group, measure_candidate

    local_process_group(rank, world, port)
    return measure_candidate(cfg, micro_batch, 2, cpu_allocations=True)["allocated_bytes"]


def accuracy_multi_rank(model: str, micro: int, zeros: list[int], methods: list[str], seq: int,
                        world: int) -> list[dict[str, Any]]:
    """ZeRO's partitioning at world size > 1 (CPU, gloo): every rank measured, the largest
    scored."""
    import ray

    from elastic_ft.core.optimizer import estimate_for
    from elastic_ft.core.ports import free_port

    task = ray.remote(num_cpus=1, max_retries=0, max_calls=1)(measure_rank)
    rows = []
    for method, zero in itertools.product(methods, zeros):
        cfg = cell_config(model, method, zero, False, seq, "bf16")
        port = free_port()
        peaks = ray.get([task.remote(cfg, micro, rank, world, port) for rank in range(world)])
        est = estimate_for(cfg, world, micro, False)
        rows.append({"model": Path(model).parent.name, "method": method, "zero_stage": zero,
                     "checkpointing": False, "micro_batch": micro, "seq_len": seq,
                     "world_size": world, "rank_peaks": peaks,
                     "predicted_bytes": est.total_bytes, "measured_bytes": max(peaks),
                     "error": (est.total_bytes - max(peaks)) / max(peaks),
                     "parts": est.to_dict()})
        print(json.dumps({k: rows[-1][k] for k in (
            "model", "method", "zero_stage", "world_size", "predicted_bytes", "rank_peaks",
            "error")}), flush=True)
    return rows


def rescore(path: Path, model: str, bucket: int) -> None:
    """Today's model against the measurements in an earlier result file."""
    from transformers import AutoConfig

    from elastic_ft.bench.hardware import git_commit
    from elastic_ft.core.memory import EngineBuffers, estimate_memory, shape_from_config

    doc = json.loads(path.read_text())
    shape = shape_from_config(AutoConfig.from_pretrained(model), 8, ("q_proj", "v_proj"))
    cuda = bool(doc["hardware"].get("gpus"))
    buffers = EngineBuffers(reduce_bucket=bucket, foreach_step=cuda)
    rows = []
    for r in doc["accuracy"]:
        if not r["measured_bytes"] or r.get("checkpointing_active") is False:
            continue  # an OOM, or a cell measured while checkpointing was silently off
        est = estimate_memory(shape, r["method"], r["zero_stage"], 1, r["micro_batch"],
                              r.get("seq_len", doc["seq_len"]), "bf16", r["checkpointing"],
                              buffers=buffers)
        rows.append(dict(r, predicted_bytes=est.total_bytes, parts=est.to_dict(),
                         error=(est.total_bytes - r["measured_bytes"]) / r["measured_bytes"]))
    errors = [abs(r["error"]) for r in rows]
    out = dict(doc, accuracy=rows, probe=[], rescored_from=str(path), reduce_bucket=bucket,
               median_abs_error=statistics.median(errors), max_abs_error=max(errors),
               share_within_10pct=sum(e <= 0.10 for e in errors) / len(errors))
    out["hardware"] = dict(doc["hardware"], commit=f"measured at {doc['hardware'].get('commit')}"
                           f"; predicted at {git_commit()}")
    stem = path.with_name(path.stem + "_rescored")
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    stem.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))


def probe_check(model: str, method: str, budget_bytes: int, seq: int, limit: int) -> dict:
    import ray

    from elastic_ft.core.probe import largest_passing, probe_micro_batch

    cfg = cell_config(model, method, 2, False, seq, "bf16", budget_bytes)
    probed = probe_micro_batch(cfg, budget_bytes, limit=limit, use_gpu=True)
    pick = probed["largest_fit"]
    task = ray.remote(num_gpus=1, max_retries=0, max_calls=1)(measure_under_cap)
    fits = {}

    def trains(m: int) -> bool:
        if m not in fits:
            fits[m] = ray.get(task.remote(cfg, m, budget_bytes))
        return fits[m]

    lo = largest_passing(trains, 4 * limit, start=pick)  # doubling above the pick, bisection
    row = {"method": method, "budget_bytes": budget_bytes, "seq_len": seq, "probe_pick": pick,
           "largest_real_fit": lo, "pick_over_real": pick / lo if lo else None,
           "probe_peaks": probed["peaks"], "probe_reserved": probed["reserved"],
           "trained_under_cap": {str(k): v for k, v in sorted(fits.items())}}
    print(json.dumps({k: row[k] for k in ("method", "budget_bytes", "probe_pick",
                                          "largest_real_fit", "pick_over_real")}), flush=True)
    return row


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"Memory model vs measured peak per worker ({doc['measure']}), seq "
             f"{doc['seq_len']}; commit {str(doc['hardware'].get('commit'))[:10]}. At world "
             "size > 1 the largest rank's peak is scored.", "",
             "| model | method | ZeRO | ckpt | world | micro | predicted GiB | measured GiB | "
             "error |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["accuracy"]:
        measured = "OOM" if r["measured_bytes"] is None else f"{r['measured_bytes'] / GiB:.3f}"
        error = "-" if r["error"] is None else f"{r['error']:+.1%}"
        lines.append(f"| {r['model']} | {r['method']} | {r['zero_stage']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r.get('world_size', 1)} | "
                     f"{r['micro_batch']} | "
                     f"{r['predicted_bytes'] / GiB:.3f} | {measured} | {error} |")
    if doc.get("rescored_from"):
        lines += ["", f"Re-predicted from the measurements in {doc['rescored_from']} "
                  f"(DeepSpeed reduce bucket {doc['reduce_bucket']:.0e} elements, as measured): "
                  f"{doc['hardware']['commit']}."]
    lines += ["", f"Median |error| {doc['median_abs_error']:.1%}, max {doc['max_abs_error']:.1%}."]
    if doc["probe"]:
        lines += ["", "| method | budget GiB | probe pick | largest that trains under the cap | "
                  "pick / real |", "|---|---|---|---|---|"]
        for p in doc["probe"]:
            ratio = "-" if p["pick_over_real"] is None else f"{p['pick_over_real']:.0%}"
            lines.append(f"| {p['method']} | {p['budget_bytes'] / GiB:.0f} | {p['probe_pick']} | "
                         f"{p['largest_real_fit']} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=None)
    ap.add_argument("--micro", default="1,4")
    ap.add_argument("--zero", default="0,1,2,3")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--seq", type=int, default=None, help="default: 1024 on GPU, 256 on CPU")
    ap.add_argument("--gpu-share", type=float, default=0.25,
                    help="GPU fraction per accuracy cell: cells run side by side on one GPU")
    ap.add_argument("--probe", default="lora:8,full:16",
                    help="METHOD:BUDGET_GIB,... probe checks (GPU only); empty to skip")
    ap.add_argument("--probe-limit", type=int, default=64)
    ap.add_argument("--world", type=int, default=2,
                    help="CPU only: also measure ZeRO 1-3 on this many ranks (largest micro)")
    ap.add_argument("--rescore", type=Path, default=None,
                    help="an earlier memory_accuracy.json to re-predict (needs one --model)")
    ap.add_argument("--bucket", type=float, default=5e8,
                    help="with --rescore: the reduce bucket (elements) it was measured with")
    args = ap.parse_args()
    if args.rescore:
        rescore(args.rescore, args.model[0], int(args.bucket))
        return

    import ray
    import torch

    from elastic_ft.bench.hardware import hardware_record, hardware_tag

    cuda = torch.cuda.is_available()
    seq = args.seq or (1024 if cuda else 256)
    models = [str(Path(m).resolve()) for m in (args.model or [str(ROOT / "assets/tiny/model")])]
    ray.init(address="local", num_cpus=os.cpu_count() if cuda else 2, include_dashboard=False)
    rows = accuracy(models, [int(x) for x in args.micro.split(",")],
                    [int(x) for x in args.zero.split(",")], args.methods.split(","), seq,
                    "bf16", args.gpu_share if cuda else 0.0)
    if not cuda and args.world > 1:
        rows += accuracy_multi_rank(models[-1], int(args.micro.split(",")[-1]),
                                    [z for z in (1, 2, 3) if str(z) in args.zero.split(",")],
                                    args.methods.split(","), seq, args.world)
    probes = []
    if cuda and args.probe:
        for pair in args.probe.split(","):
            method, gib = pair.split(":")
            probes.append(probe_check(models[-1], method, int(float(gib) * GiB), seq,
                                      args.probe_limit))
    errors = [abs(r["error"]) for r in rows if r["error"] is not None]
    hardware = hardware_record()
    doc = {"benchmark": "memory_accuracy", "hardware": hardware, "seq_len": seq,
           "measure": "torch.cuda.max_memory_allocated" if cuda else
           "peak live CPU tensor bytes (CpuAllocatedPeak); reserved_bytes = RSS growth",
           "accuracy": rows, "probe": probes,
           "median_abs_error": statistics.median(errors), "max_abs_error": max(errors),
           "share_within_10pct": sum(e <= 0.10 for e in errors) / len(errors)}
    out = ROOT / "benchmarks" / "results" / hardware_tag(hardware)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_accuracy.json").write_text(json.dumps(doc, indent=2))
    (out / "memory_accuracy.md").write_text(markdown(doc))
    if os.environ.get("OUT"):
        for name in ("memory_accuracy.json", "memory_accuracy.md"):
            Path(os.environ["OUT"], name).write_text((out / name).read_text())
    print(markdown(doc))


if __name__ == "__main__":
    main()
