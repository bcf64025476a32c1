"""What spot would do for a 7B LoRA fine-tune on the public V100 traces, per policy.

Replays every trace in benchmarks/spot-traces/ (Wu et al., "Can't Be Late", NSDI 2024) through
the simulator (elastic_ft/sim) for one job: a fixed number of tokens of a 7B LoRA fine-tune,
global batch 128 x 2048 tokens, on 1 V100 per node (p3.2xlarge: $3.06/h on demand, $0.92 spot):

- workers: the 16-node traces 4-16 nodes, the 4-node traces 1-4;
- step time: modelled, not measured (there is no V100 here): 6 x 7e9 FLOPs per token (LoRA with
  gradient checkpointing: forward, recomputed forward, backward of the activations) at 30% of
  the V100's 125 TFLOP/s fp16 peak = 893 tokens/s per node, scaled linearly with nodes;
- recovery seconds per kind of change: measured by benchmarks/elastic_recovery.py on this
  machine (elastic_ft drain / join / hard loss; plain Ray Train for the restart policies);
  a second pass with each one 4x longer (a 7B model and its checkpoint to load);
- checkpoint: 5 s (a LoRA adapter and its optimizer state), every 50 steps;
- notices: AWS's 2 minutes before each fall in a trace; a third pass with none (every loss hard).

    python benchmarks/spot_policies.py
Writes benchmarks/results/simulated/spot_policies.{json,md} (the JSON with the commit and
hardware it ran on) and one plot per trace kind.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elastic_ft.sim.calibration import Calibration, recovery_from_benchmark  # noqa: E402
from elastic_ft.sim.compare import CITATION, compare, plot  # noqa: E402
from elastic_ft.sim.policies import Job  # noqa: E402
from elastic_ft.sim.traces import load_trace  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRACES = ROOT / "benchmarks" / "spot-traces"
RECOVERY = ROOT / "benchmarks" / "results" / "cpu-2core" / "elastic_recovery.json"
TOKENS = 500e6
TOKENS_PER_STEP = 128 * 2048
TOKENS_PER_S_PER_NODE = 125e12 * 0.30 / (6 * 7e9)
SPOT, ON_DEMAND = 0.92, 3.06
GOAL = {"goodput": 0.90, "cost_vs_on_demand": 0.40}  # >= 90% goodput at >= 60% lower cost


def calibration(recovery_scale: float) -> Calibration:
    measured = recovery_from_benchmark(RECOVERY)
    step_s = {1: TOKENS_PER_STEP / TOKENS_PER_S_PER_NODE}
    return Calibration(step_s, {k: v * recovery_scale for k, v in measured.items()}, 5.0, {
        "step_s": f"modelled: {TOKENS_PER_S_PER_NODE:.0f} tokens/s per V100 (6N FLOPs/token "
                  f"at 30% of 125 TFLOP/s), linear in nodes",
        "recovery_s": f"{RECOVERY.relative_to(ROOT)} x {recovery_scale}",
        "checkpoint_s": "given: 5 s (LoRA adapter + optimizer state)"})


def main() -> None:
    out = ROOT / "benchmarks" / "results" / "simulated"
    out.mkdir(parents=True, exist_ok=True)
    steps = int(TOKENS / TOKENS_PER_STEP)
    passes = {"measured recovery, 2 min notice": (1.0, 120.0),
              "recovery x4, 2 min notice": (4.0, 120.0),
              "measured recovery, no notice": (1.0, 0.0)}
    results, lines = [], []
    for label, (scale, notice_s) in passes.items():
        cal = calibration(scale)
        lines += [f"## {label}", "", "| trace | policy | finished | hours | cost $ | "
                  "vs on-demand | goodput | lost steps | restarts | goal |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for path in sorted(TRACES.glob("*/*.json")):
            nodes = 16 if path.parent.name.startswith("availability-16") else 4
            job = Job(steps, max(1, nodes // 4), nodes, 50, TOKENS_PER_STEP)
            trace = load_trace(path, notice_s=notice_s, cap=nodes)
            result = compare(trace, job, cal, SPOT, ON_DEMAND)
            result["pass"] = label
            results.append(result)
            if scale == 1.0 and notice_s > 0 and path.stem in ("us-west-2a", "us-east-1f"):
                plot(result, out / f"spot_policies_{path.parent.name[:15]}_{path.stem}.png")
            for r in result["rows"]:
                goal = (r["finished"] and r["goodput"] >= GOAL["goodput"] and
                        (r["cost_vs_on_demand"] or 9) <= GOAL["cost_vs_on_demand"])
                hours = "-" if r["completion_h"] is None else f"{r['completion_h']:.1f}"
                lines.append(
                    f"| {path.parent.name[:15]}/{path.stem} | {r['policy']} | "
                    f"{'yes' if r['finished'] else 'no'} | {hours} | {r['cost']:.0f} | "
                    f"{r['cost_vs_on_demand']:.2f} | {r['goodput']:.1%} | {r['lost_steps']} | "
                    f"{r['restarts']} | {'met' if goal else '-'} |")
        lines.append("")
    header = [f"# Spot policies on the public V100 traces: {TOKENS / 1e6:.0f}M tokens of 7B "
              f"LoRA ({steps} steps of {TOKENS_PER_STEP} tokens)", "", CITATION, "",
              "Goal: goodput >= 90% at a cost >= 60% below on-demand (vs on-demand <= 0.40). "
              "Hours count from the trace's start, waiting for the first nodes included.", ""]
    (out / "spot_policies.md").write_text("\n".join(header + lines))
    for r in results:
        r.pop("timelines")
    from elastic_ft.bench.hardware import hardware_record

    (out / "spot_policies.json").write_text(json.dumps(
        {"benchmark": "spot_policies", "hardware": hardware_record(), "results": results},
        indent=1))
    print("\n".join(header + lines))


if __name__ == "__main__":
    main()
