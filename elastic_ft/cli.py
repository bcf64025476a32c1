"""`elastic-ft`: a thin command line over the library; each command is one call."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from elastic_ft.config import ConfigError, load_config, parse_override


def _config(path: str, overrides: tuple[str, ...]):
    try:
        return load_config(path, dict(parse_override(o) for o in overrides))
    except ConfigError as error:
        raise click.ClickException(str(error)) from None


@click.group()
def main() -> None:
    """Elastic, spot-tolerant LLM fine-tuning on Ray Train + DeepSpeed."""


@main.command("make-tiny-assets")
@click.argument("out_dir", type=click.Path())
@click.option("--vocab-size", default=1000, show_default=True)
@click.option("--hidden-size", default=64, show_default=True,
              help="1024 with --layers 16 --model-vocab 32000: a ~270M-parameter Llama")
@click.option("--layers", default=2, show_default=True)
@click.option("--model-vocab", type=int, default=None, help="embedding rows (>= tokenizer's)")
def make_tiny_assets_cmd(out_dir: str, vocab_size: int, hidden_size: int, layers: int,
                         model_vocab: int | None) -> None:
    """Write a local tokenizer and a random-init Llama to OUT_DIR/{tokenizer,model}."""
    from elastic_ft.core.tiny_assets import make_tiny_assets

    click.echo(json.dumps(make_tiny_assets(out_dir, vocab_size=vocab_size,
                                           hidden_size=hidden_size, num_layers=layers,
                                           model_vocab_size=model_vocab), indent=2))


@main.command()
@click.argument("config")
@click.option("--set", "overrides", multiple=True, help="section.field=value (YAML value)")
@click.option("--no-export", is_flag=True, help="skip writing adapter/ and merged/")
def train(config: str, overrides: tuple[str, ...], no_export: bool) -> None:
    """Fine-tune; resumes from the newest valid checkpoint in the run's storage."""
    from elastic_ft.core.trainer import run_training

    cfg = _config(config, overrides)
    summary = run_training(cfg, export=not no_export)
    keys = ["initial_loss", "final_loss", "steps", "tokens", "wall_s", "world_size",
            "tokens_per_s", "peak_mem_bytes"]
    click.echo(json.dumps({k: summary[k] for k in keys}, indent=2))
    click.echo(f"summary: {Path(cfg.output_dir) / 'summary.json'}")


@main.command()
@click.argument("config")
@click.option("--set", "overrides", multiple=True)
def prepare(config: str, overrides: tuple[str, ...]) -> None:
    """Run the data pipeline (Ray Data) and materialise OUTPUT/prepared/ before training."""
    from elastic_ft.core.model import tokenizer_path
    from elastic_ft.core.trainer import ensure_ray
    from elastic_ft.data.pipeline import prepare_data

    cfg = _config(config, overrides).with_absolute_paths()
    ensure_ray()
    _, report = prepare_data(cfg.data, tokenizer_path(cfg), cfg.output_dir, engine="ray")
    click.echo(report.table())


@main.command("validate-data")
@click.argument("paths", nargs=-1, required=True)
@click.option("--format", "fmt", default="auto", show_default=True)
@click.option("--seq-len", default=2048, show_default=True)
@click.option("--tokenizer", required=True, help="tokenizer path or hub name")
@click.option("--too-long", type=click.Choice(["drop", "truncate"]), default="truncate")
@click.option("--out", "out_dir", required=True, type=click.Path())
def validate_data(paths: tuple[str, ...], fmt: str, seq_len: int, tokenizer: str, too_long: str,
                  out_dir: str) -> None:
    """Validate and measure data without training: DIR/report.json and DIR/quarantine.jsonl."""
    from pydantic import ValidationError

    from elastic_ft.config import DataConfig, format_validation_error
    from elastic_ft.data.pipeline import prepare_data
    from elastic_ft.data.report import DataQualityError

    try:
        cfg = DataConfig(paths=list(paths), format=fmt, seq_len=seq_len, too_long=too_long,
                         max_reject_rate=1.0)
    except ValidationError as error:
        raise click.ClickException(format_validation_error(error, DataConfig)) from None
    try:
        _, report = prepare_data(cfg, tokenizer, out_dir, engine="local", write_blocks_file=False)
    except DataQualityError as error:
        raise click.ClickException(str(error)) from None
    out = Path(out_dir)
    (out / "data_report.json").replace(out / "report.json")
    click.echo(report.table())
    click.echo(f"report: {out / 'report.json'}  quarantine: {out / 'quarantine.jsonl'}")


@main.command()
@click.argument("config")
@click.option("--gpus", default="1", show_default=True,
              help="workers (GPUs) in the run: a count (with --gpu-mem) or a mixed inventory "
                   "such as 4xA100-80GB,4xL4-24GB")
@click.option("--gpu-mem", default="80GiB", show_default=True, help="memory per GPU")
@click.option("--json", "as_json", is_flag=True)
@click.option("--set", "overrides", multiple=True)
def plan(config: str, gpus: str, gpu_mem: str, as_json: bool, overrides: tuple[str, ...]) -> None:
    """Per-worker memory of every method/ZeRO/checkpointing/offload combination; a pick, and
    each worker's share of the global batch."""
    from elastic_ft.core.planner import parse_inventory, plan_table, render_table

    cfg = _config(config, overrides)
    try:
        devices = parse_inventory(gpus, gpu_mem)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--gpus") from None
    result = plan_table(cfg, devices)
    click.echo(json.dumps(result, indent=2) if as_json else render_table(result))


@main.command()
@click.argument("config")
@click.option("--set", "overrides", multiple=True)
def export(config: str, overrides: tuple[str, ...]) -> None:
    """Write OUTPUT/adapter (peft) and OUTPUT/merged (Hugging Face) from a finished run."""
    from elastic_ft.core.export import export_outputs

    click.echo(json.dumps(export_outputs(_config(config, overrides).with_absolute_paths()),
                          indent=2))


@main.command()
@click.argument("config")
@click.option("--address", default="http://127.0.0.1:8265", show_default=True)
@click.option("--no-wait", is_flag=True, help="print the job id and return")
@click.option("--set", "overrides", multiple=True)
def submit(config: str, address: str, no_wait: bool, overrides: tuple[str, ...]) -> None:
    """Submit `elastic-ft train CONFIG` to a cluster through the Ray Jobs API."""
    from elastic_ft.launch import submit_job

    _config(config, overrides)  # fail here, not on the cluster
    status = submit_job(config, address, list(overrides), wait=not no_wait, echo=click.echo)
    if status not in ("SUCCEEDED", "PENDING", "RUNNING"):
        sys.exit(1)


@main.command()
@click.argument("job_id")
@click.option("--address", default="http://127.0.0.1:8265", show_default=True)
def status(job_id: str, address: str) -> None:
    """Status of a submitted job."""
    from ray.job_submission import JobSubmissionClient

    click.echo(JobSubmissionClient(address).get_job_status(job_id).value)


@main.command()
@click.argument("job_id")
@click.option("--address", default="http://127.0.0.1:8265", show_default=True)
def stop(job_id: str, address: str) -> None:
    """Stop a submitted job (the newest valid checkpoint stays; re-run to resume)."""
    from ray.job_submission import JobSubmissionClient

    click.echo("stopped" if JobSubmissionClient(address).stop_job(job_id) else "not running")


@main.group()
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


if __name__ == "__main__":
    main()
