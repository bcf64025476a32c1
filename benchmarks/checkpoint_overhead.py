"""Checkpoint overhead as a share of training time at the default interval, async vs sync.

Three runs of the same job (2 workers, tiny LoRA model, ZeRO-2), interleaved over repeats:
checkpoints every `every` steps uploaded asynchronously (the default), the same synchronously,
and a reference with only the final checkpoint. Reported per mode: the seconds the training
loop was blocked by checkpoints over the trained span (the direct cost), and the wall-clock
difference to the reference over the same steps (the total cost, noisier).

    python benchmarks/checkpoint_overhead.py [--steps 200 --every 50 --repeats 3]
Writes benchmarks/results/<hardware>/checkpoint_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

ROOT = Path(__file__).resolve().parents[1]


def one_run(model: Path, out: Path, steps: int, every: int, upload: str) -> dict:
    from elastic_ft.config import load_config
    from elastic_ft.core.trainer import run_training
    from elastic_ft.events import read_events

    cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": str(model), "output_dir": str(out), "train.max_steps": steps,
        "checkpoint.every_steps": every, "checkpoint.upload": upload})
    run_training(cfg, export=False)
    metrics = read_events(out / "metrics.jsonl")
    span_s = metrics[-1]["t"] - metrics[0]["t"]  # step 1 end -> last step end
    blocked = [e for e in read_events(out / "events.jsonl")
               if e["event"] == "checkpoint" and e["step"] < steps]  # the final one is common
    return {"span_s": span_s, "blocked_s": sum(e["seconds"] for e in blocked),
            "checkpoints": len(blocked),
            "median_checkpoint_s": statistics.median([e["seconds"] for e in blocked])
            if blocked else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50, help="the config default is 50")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import ray

    from elastic_ft.bench.hardware import hardware_record
    from elastic_ft.bench.report import save_benchmark
    from elastic_ft.core.tiny_assets import make_tiny_assets
    from elastic_ft.core.trainer import start_local_ray

    work = Path(tempfile.mkdtemp(prefix="eft_ckptbench_"))
    make_tiny_assets(work / "assets")
    model = work / "assets" / "model"
    start_local_ray(num_cpus=4, include_dashboard=False, log_to_driver=False)
    runs: dict[str, list[dict]] = {"async": [], "sync": [], "final_only": []}
    for i in range(args.repeats):
        for mode in runs:
            every = args.steps if mode == "final_only" else args.every
            upload = "sync" if mode == "sync" else "async"
            runs[mode].append(one_run(model, work / f"{mode}{i}", args.steps, every, upload))
            print(mode, json.dumps(runs[mode][-1]), flush=True)
    ray.shutdown()
    reference_span = statistics.median(r["span_s"] for r in runs["final_only"])
    summary = {}
    for mode in ("async", "sync"):
        summary[mode] = {
            "blocked_share": statistics.median(r["blocked_s"] / r["span_s"] for r in runs[mode]),
            "wall_overhead_vs_final_only": statistics.median(r["span_s"] for r in runs[mode])
            / reference_span - 1,
            "median_checkpoint_s": statistics.median(r["median_checkpoint_s"]
                                                     for r in runs[mode]),
        }
    hardware = hardware_record()
    result = {"benchmark": "checkpoint_overhead", "steps": args.steps, "every": args.every,
              "repeats": args.repeats, "hardware": hardware, "summary": summary, "runs": runs,
              "reference_span_s": reference_span}
    save_benchmark(result, summary)


if __name__ == "__main__":
    main()
