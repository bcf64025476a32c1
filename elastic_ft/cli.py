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
@click.option("--verbose", is_flag=True,
              help="show Ray's, DeepSpeed's and the workers' logs here, not in OUTPUT/logs/")
@click.option("--inputs", default=None, hidden=True,
              help="(submit) the shipped inputs package that @inputs/ paths refer to")
def train(config: str, overrides: tuple[str, ...], no_export: bool, verbose: bool,
          inputs: str | None) -> None:
    """Fine-tune; resumes from the newest valid checkpoint in the run's storage."""
    from elastic_ft.core.trainer import run_training
    from elastic_ft.preflight import require_valid
    from elastic_ft.report.console import quiet_terminal

    if inputs is not None:
        from elastic_ft.launch import resolve_inputs

        _, resolved = resolve_inputs(inputs, [config, *overrides])
        config, overrides = resolved[0], tuple(resolved[1:])
    cfg = _config(config, overrides)
    out = Path(cfg.output_dir)
    with quiet_terminal(out / "logs", verbose) as console:
        try:
            require_valid(cfg)  # seconds, before any compute
            summary = run_training(cfg, export=not no_export)
        except Exception as error:
            import traceback

            traceback.print_exc()  # the full trace into the run's log
            known = isinstance(error, (ConfigError, RuntimeError, ValueError, OSError))
            detail = str(error) if known else traceback.format_exc().rstrip()
            where = f"\nfull log: {console.log_path}" if console.log_path else ""
            console.line(f"error: {detail}{where}")
            sys.exit(1)
        keys = ["initial_loss", "final_loss", "steps", "tokens", "wall_s", "world_size",
                "tokens_per_s", "peak_mem_bytes", "eval"]
        console.line("\n".join(f"{k}: {json.dumps(summary.get(k))}" for k in keys))
        console.line(f"summary: {out / 'summary.json'}")


@main.command()
@click.argument("run_or_model", type=click.Path(exists=True))
@click.option("--prompt", "prompts", multiple=True, required=True, help="repeat for several")
@click.option("--max-new-tokens", default=64, show_default=True)
def generate(run_or_model: str, prompts: tuple[str, ...], max_new_tokens: int) -> None:
    """Greedy completions from a run's merged/ model (or base + adapter/), or a model dir;
    prompts rendered as the run's training rendered a user turn."""
    from transformers.utils import logging as hf_logging

    from elastic_ft.core.generate import load_for_generation

    hf_logging.set_verbosity_error()  # the completion only: no loading bars or notices
    hf_logging.disable_progress_bar()
    try:
        model = load_for_generation(Path(run_or_model))
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    for prompt in prompts:
        completion = model.complete(prompt, max_new_tokens)
        click.echo(completion if completion.strip() else
                   "(no text: the model ended its answer at once)")


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


@main.command()
@click.argument("config")
@click.option("--gpus", default=None, help="check memory for these GPUs: 8 or 4xA100-80GB,...")
@click.option("--gpu-mem", default="80GiB", show_default=True, help="with --gpus N")
@click.option("--set", "overrides", multiple=True)
def validate(config: str, gpus: str | None, gpu_mem: str, overrides: tuple[str, ...]) -> None:
    """Pre-flight checks before any compute: config, model, data, storage, memory, cluster."""
    from elastic_ft.preflight import validate as run_checks

    cfg = _config(config, overrides)
    findings, sample = run_checks(cfg, count_rows=True, gpus=gpus, gpu_mem=gpu_mem)
    click.echo("ok    config   " + config)
    for finding in findings:
        click.echo(finding.line())
    if sample is not None:
        click.echo("one sample as the model sees it, trained tokens in [[...]]:\n" + sample)
    if any(not f.ok for f in findings):
        sys.exit(1)


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
    from elastic_ft.preflight import check_model

    cfg = _config(config, overrides)
    try:
        devices = parse_inventory(gpus, gpu_mem)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--gpus") from None
    problems = [f.message for f in check_model(cfg, True, method=False) if not f.ok]
    if problems:  # before transformers fails on a missing path with a traceback
        raise click.ClickException("\n".join(problems))
    result = plan_table(cfg, devices)
    click.echo(json.dumps(result, indent=2) if as_json else render_table(result))


@main.command()
@click.argument("config")
@click.option("--set", "overrides", multiple=True)
def export(config: str, overrides: tuple[str, ...]) -> None:
    """Write OUTPUT/adapter (peft) and OUTPUT/merged (Hugging Face) from a finished run, in a
    Ray task on a node with the memory for the merge (RAY_ADDRESS, or a local Ray)."""
    import ray

    from elastic_ft.core.export import export_on_cluster
    from elastic_ft.core.trainer import ensure_ray

    cfg = _config(config, overrides).with_absolute_paths()
    started = ensure_ray()
    try:
        click.echo(json.dumps(export_on_cluster(cfg), indent=2))
    except (RuntimeError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    finally:
        if started:
            ray.shutdown()


@main.command()
@click.argument("config")
@click.option("--address", default="http://127.0.0.1:8265", show_default=True)
@click.option("--no-wait", is_flag=True, help="print the job id and return")
@click.option("--shared", multiple=True,
              help="a path prefix every node reads (NFS, a mounted bucket): not uploaded")
@click.option("--set", "overrides", multiple=True)
def submit(config: str, address: str, no_wait: bool, shared: tuple[str, ...],
           overrides: tuple[str, ...]) -> None:
    """Submit `elastic-ft train CONFIG` to a cluster through the Ray Jobs API; its local
    inputs (model, tokenizer, data) go with it. Exits with the job's result."""
    from elastic_ft.launch import submit_job
    from elastic_ft.preflight import PreflightError, require_valid

    cfg = _config(config, overrides)
    try:  # fail here, not on the cluster
        require_valid(cfg)
        status = submit_job(config, cfg, address, list(overrides), wait=not no_wait,
                            echo=click.echo, shared=list(shared))
    except (PreflightError, ConfigError) as error:
        raise click.ClickException(str(error)) from None
    running = no_wait and status in ("PENDING", "RUNNING")
    sys.exit(0 if status == "SUCCEEDED" or running else 1)


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


@main.command()
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="the report as JSON (cost_report.json)")
def report(output_dir: str, as_json: bool) -> None:
    """What a run (finished or running) cost: nodes, prices, goodput, time lost."""
    from elastic_ft.report.cost import report_for_run

    try:
        result = report_for_run(output_dir)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.table())


from elastic_ft.bench.commands import bench  # noqa: E402  (the `bench` group)
from elastic_ft.sim.command import simulate  # noqa: E402

main.add_command(bench)
main.add_command(simulate)

if __name__ == "__main__":
    main()
