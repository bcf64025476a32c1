"""Benchmark results as JSON, Markdown tables and PNG plots; several machines side by side."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from elastic_ft.bench.hardware import hardware_tag


def default_out_dir(result: dict[str, Any]) -> Path:
    return Path("benchmarks") / "results" / hardware_tag(result["hardware"])


def scaling_markdown(result: dict[str, Any]) -> str:
    hw = result["hardware"]
    device = (f"{hw['gpu_count']} x {hw['gpus'][0]['name']}" if hw["gpus"]
              else f"{hw['cpu_model']} ({hw['cpu_cores']} cores)")
    lines = [f"Scaling on {device}, {result['method']} ZeRO-{result['zero_stage']}, seq "
             f"{result['seq_len']}; MFU peak {result['peak_flops_per_s']:.3g} FLOP/s "
             f"({result['peak_source']}); commit {str(hw.get('commit'))[:10]}", "",
             "| mode | workers | global batch | tokens/s | tokens/s/worker | efficiency | MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['workers']} | {r['global_batch']} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_s_per_worker']:.0f} | "
                     f"{r['efficiency']:.0%} | {r['mfu']:.2%} |")
    return "\n".join(lines) + "\n"


def scaling_plot(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tps, ax_eff) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        tag = hardware_tag(result["hardware"])
        for mode in sorted({r["mode"] for r in result["rows"]}):
            rows = [r for r in result["rows"] if r["mode"] == mode]
            workers = [r["workers"] for r in rows]
            ax_tps.plot(workers, [r["tokens_per_s"] for r in rows], marker="o",
                        label=f"{tag} {mode}")
            ax_eff.plot(workers, [r["efficiency"] for r in rows], marker="o",
                        label=f"{tag} {mode}")
    ax_tps.set(xlabel="workers", ylabel="tokens/s", title="throughput")
    ax_eff.set(xlabel="workers", ylabel="efficiency vs 1 worker", title="scaling efficiency",
               ylim=(0, 1.2))
    for ax in (ax_tps, ax_eff):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_result(result: dict[str, Any], out_dir: Path, name: str,
                 markdown: Callable[[dict[str, Any]], str],
                 plot: Callable[[dict[str, Any], Path], Path]) -> dict[str, Path]:
    """NAME.json (raw results + environment), NAME.md and NAME.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "markdown": out_dir / f"{name}.md",
             "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(result, indent=2))
    paths["markdown"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths


def write_scaling(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    return write_result(result, out_dir, "scaling", scaling_markdown,
                        lambda r, path: scaling_plot([r], path))


def compare_markdown(results: list[dict[str, Any]]) -> str:
    """One table, one row per (machine, mode, workers): the machines side by side."""
    lines = ["| hardware | commit | mode | workers | tokens/s | tokens/s/worker | efficiency "
             "| MFU |", "|---|---|---|---|---|---|---|---|"]
    for result in results:
        tag, commit = hardware_tag(result["hardware"]), str(result["hardware"].get("commit"))
        for r in result["rows"]:
            lines.append(f"| {tag} | {commit[:10]} | {r['mode']} | {r['workers']} | "
                         f"{r['tokens_per_s']:.0f} | {r['tokens_per_s_per_worker']:.0f} | "
                         f"{r['efficiency']:.0%} | {r['mfu']:.2%} |")
    return "\n".join(lines) + "\n"


def overhead_markdown(result: dict[str, Any]) -> str:
    tps, ratios, rounds = result["tokens_per_s"], result["ratios"], result["rounds"]
    lines = [f"Overhead at world size {result['world_size']}, global batch "
             f"{result['global_batch']}, {result['steps']} steps ({result['warmup_steps']} "
             f"warm-up), {len(rounds)} interleaved round(s). Trainable tokens per second: the "
             "median of the steps' own rates (a stall of the shared machine moves it no more "
             "than one step) and over the whole timed span; medians of rounds, per-round "
             "figures after them.", "",
             "| loop | tokens/s, median step | per round | tokens/s, span | "
             "elastic_ft / this, median step | elastic_ft / this, span |",
             "|---|---|---|---|---|---|"]
    for name in ("elastic_ft", "plain_deepspeed", "hf_trainer"):
        per_round = ", ".join(f"{r[name]['median_step']:.0f}" for r in rounds)
        step_ratio = ratios["median_step"].get(name, 1.0)
        span_ratio = ratios["span"].get(name, 1.0)
        lines.append(f"| {name} | {tps['median_step'][name]:.0f} | {per_round} | "
                     f"{tps['span'][name]:.0f} | {step_ratio:.3f} | {span_ratio:.3f} |")
    low, high = result["elastic_ft_vs_plain_range"]
    lines += ["", f"elastic_ft / plain DeepSpeed, median step, per round: {low:.3f} to "
              f"{high:.3f}. elastic_ft's own cost per step (median step time minus the plain "
              f"loop's, same batches): {1000 * result['extra_s_per_step']:.1f} ms of "
              f"{1000 * result['step_s']['plain_deepspeed']:.0f} ms."]
    return "\n".join(lines) + "\n"


def save_benchmark(result: dict[str, Any], summary: Any) -> Path:
    """benchmarks/results/<hardware-tag>/<benchmark>.json; prints the summary and the path."""
    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    out = root / hardware_tag(result["hardware"]) / f"{result['benchmark']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")
    return out
