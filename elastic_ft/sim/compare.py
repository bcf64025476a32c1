"""`elastic-ft simulate`: every policy on the same trace, as JSON, a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from elastic_ft.sim.calibration import Calibration
from elastic_ft.sim.policies import POLICIES, Job, simulate
from elastic_ft.sim.traces import Trace

CITATION = ("spot traces: Wu et al., \"Can't Be Late: Optimizing Spot Instance Savings under "
            "Deadlines\", NSDI 2024 (github.com/skypilot-org/spot-traces)")


def compare(trace: Trace, job: Job, cal: Calibration, spot_per_h: float | None,
            on_demand_per_h: float | None, policies: tuple[str, ...] = POLICIES
            ) -> dict[str, Any]:
    results = {p: simulate(p, trace, job, cal, on_demand_per_h if p == "on_demand"
                           else spot_per_h) for p in policies}
    base = results.get("on_demand")
    rows = []
    for r in results.values():
        row = r.to_dict()
        row["completion_h"] = None if r.completion_s is None else r.completion_s / 3600
        row["cost_vs_on_demand"] = (r.cost / base.cost if base and base.cost and r.cost
                                    is not None else None)
        rows.append(row)
    return {"trace": trace.name, "job": job.__dict__, "calibration": cal.to_dict(),
            "step_s_by_world": {w: {"s": cal.step_time(w), "source": cal.source_of_step(w)}
                                for w in range(job.min_workers, job.max_workers + 1)},
            "prices": {"spot_per_h": spot_per_h, "on_demand_per_h": on_demand_per_h},
            "citation": CITATION if trace.name and not trace.open_ended else None,
            "rows": rows, "timelines": {n: r.timeline for n, r in results.items()}}


def table(result: dict[str, Any]) -> str:
    def fmt(x: float | None, spec: str, none: str = "-") -> str:
        return none if x is None else format(x, spec)

    lines = [f"trace {result['trace']}: {result['job']['steps']} steps on "
             f"{result['job']['min_workers']}-{result['job']['max_workers']} nodes",
             "", "| policy | finished | completion h | cost $ | vs on-demand | goodput | "
             "lost steps | restarts |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['policy']} | {'yes' if r['finished'] else 'no'} "
            f"({r['steps_done']}) | {fmt(r['completion_h'], '.2f', 'not within trace')} | "
            f"{fmt(r['cost'], ',.2f', 'unpriced')} | {fmt(r['cost_vs_on_demand'], '.2f')} | "
            f"{r['goodput']:.1%} | {r['lost_steps']} | {r['restarts']} |")
    if result.get("citation"):
        lines += ["", result["citation"]]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Nodes available and the world size trained at, over time, one panel per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timelines = result["timelines"]
    fig, axes = plt.subplots(len(timelines), 1, figsize=(9, 2.2 * len(timelines)),
                             sharex=True, squeeze=False)
    for ax, (name, points) in zip(axes[:, 0], timelines.items(), strict=True):
        t = [p[0] / 3600 for p in points]
        ax.step(t, [p[1] for p in points], where="post", label="nodes available", alpha=0.6)
        ax.step(t, [p[2] for p in points], where="post", label="world size")
        ax.set_ylabel(name)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("hours")
    fig.suptitle(f"{result['trace']}" + (f"\n{result['citation']}" if result.get("citation")
                                          else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "simulate.json", "table": out_dir / "simulate.md",
             "plot": out_dir / "simulate.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["table"].write_text(table(result) + "\n")
    plot(result, paths["plot"])
    return paths


