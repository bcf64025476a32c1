"""`elastic-ft bench ...`: the benchmark commands (a group of the main command line)."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _config(path: str, overrides: tuple[str, ...]):
    from elastic_ft.cli import _config as load  # the main command line's config errors

    return load(path, overrides)


@click.group()
def bench() -> None:
    """Benchmarks run as Ray Tune experiments: JSON, a Markdown table and PNG plots."""


@bench.command("scaling")
@click.argument("config")
@click.option("--workers", default="1,2", show_default=True, help="worker counts, e.g. 1,2,4")
@click.option("--steps", default=10, show_default=True)
@click.option("--warmup-steps", default=2, show_default=True)
@click.option("--mode", type=click.Choice(["both", "strong", "weak"]), default="both",
              show_default=True)
@click.option("--out", type=click.Path(), default=None,
              help="default: benchmarks/results/<hardware-tag>/")
@click.option("--set", "overrides", multiple=True)
def bench_scaling(config: str, workers: str, steps: int, warmup_steps: int, mode: str,
                  out: str | None, overrides: tuple[str, ...]) -> None:
    """Tokens/s, per-worker tokens/s, strong/weak efficiency and MFU for each worker count."""
    from elastic_ft.bench.report import default_out_dir, scaling_markdown, write_scaling
    from elastic_ft.bench.scaling import run_scaling

    cfg = _config(config, overrides)
    counts = [int(w) for w in workers.split(",")]
    modes = ("strong", "weak") if mode == "both" else (mode,)
    work = Path(out or "runs/bench") / "work"
    result = run_scaling(cfg, counts, work, steps=steps, warmup_steps=warmup_steps,
                         modes=modes)
    paths = write_scaling(result, Path(out) if out else default_out_dir(result))
    click.echo(scaling_markdown(result))
    click.echo(json.dumps({k: str(v) for k, v in paths.items()}))


@bench.command("overhead")
@click.argument("config")
@click.option("--steps", default=30, show_default=True)
@click.option("--warmup-steps", default=5, show_default=True)
@click.option("--repeats", default=1, show_default=True,
              help="interleaved rounds; medians are reported")
@click.option("--out", type=click.Path(), default=None,
              help="default: benchmarks/results/<hardware-tag>/")
@click.option("--set", "overrides", multiple=True)
def bench_overhead(config: str, steps: int, warmup_steps: int, repeats: int, out: str | None,
                   overrides: tuple[str, ...]) -> None:
    """elastic_ft tokens/s against a plain DeepSpeed loop and Ray Train + HF Trainer."""
    from elastic_ft.bench.overhead import run_overhead
    from elastic_ft.bench.report import default_out_dir, overhead_markdown

    cfg = _config(config, overrides)
    result = run_overhead(cfg, Path(out or "runs/bench") / "overhead-work", steps, warmup_steps,
                          repeats)
    out_dir = Path(out) if out else default_out_dir(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "overhead.json").write_text(json.dumps(result, indent=2))
    (out_dir / "overhead.md").write_text(overhead_markdown(result))
    click.echo(overhead_markdown(result))


@bench.command("matrix")
@click.argument("config")
@click.option("--methods", default="lora,full", show_default=True)
@click.option("--zero", "zero_stages", default="1,2,3", show_default=True)
@click.option("--ckpt", default="off,on", show_default=True, help="gradient checkpointing")
@click.option("--attn", default=None, help="default: eager,sdpa (+flash_attention_2 if "
              "flash-attn is installed and a GPU is present)")
@click.option("--workers", default=2, show_default=True)
@click.option("--lomo/--no-lomo", default=True, show_default=True)
@click.option("--steps", default=6, show_default=True)
@click.option("--out", type=click.Path(), default=None)
@click.option("--set", "overrides", multiple=True)
def bench_matrix(config: str, methods: str, zero_stages: str, ckpt: str, attn: str | None,
                 workers: int, lomo: bool, steps: int, out: str | None,
                 overrides: tuple[str, ...]) -> None:
    """Peak memory and step time: checkpointing x LoRA/full x ZeRO x attention (+ LOMO)."""
    import importlib.util

    import torch

    from elastic_ft.bench.matrix import matrix_cells, matrix_markdown, run_matrix, write_matrix
    from elastic_ft.bench.report import default_out_dir

    if attn is None:
        attn = "eager,sdpa" + (",flash_attention_2" if torch.cuda.is_available()
                               and importlib.util.find_spec("flash_attn") else "")
    cells = matrix_cells(methods.split(","), [int(z) for z in zero_stages.split(",")],
                         [c == "on" for c in ckpt.split(",")], attn.split(","), workers, lomo)
    result = run_matrix(_config(config, overrides), cells,
                        Path(out or "runs/bench") / "matrix-work", steps)
    paths = write_matrix(result, Path(out) if out else default_out_dir(result))
    click.echo(matrix_markdown(result))
    click.echo(json.dumps({k: str(v) for k, v in paths.items()}))


@bench.command("compare")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--png", type=click.Path(), default=None, help="also plot them together")
def bench_compare(results: tuple[str, ...], png: str | None) -> None:
    """Put scaling results from different machines side by side."""
    from elastic_ft.bench.report import compare_markdown, scaling_plot

    loaded = [json.loads(Path(r).read_text()) for r in results]
    click.echo(compare_markdown(loaded))
    if png:
        click.echo(f"plot: {scaling_plot(loaded, Path(png))}")
