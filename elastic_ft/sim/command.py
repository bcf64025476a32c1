"""`elastic-ft simulate CONFIG --trace TRACE`: the run's job replayed on a spot trace."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _recovery_overrides(pairs: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for pair in pairs:
        kind, _, seconds = pair.partition("=")
        try:
            out[kind.strip()] = float(seconds)
        except ValueError:
            raise click.BadParameter(f"{pair!r}: give KIND=SECONDS, e.g. hard_loss=35",
                                     param_hint="--recovery-s") from None
    return out


@click.command()
@click.argument("config")
@click.option("--trace", "trace_path", required=True,
              help="a SkyPilot spot trace (.json) or t,kind,node events (.jsonl / .csv)")
@click.option("--policy", "policies", default="elastic_ft,restart,wait,on_demand",
              show_default=True)
@click.option("--steps", type=int, default=None, help="default: the config's train.max_steps")
@click.option("--scaling", default=None, help="step time per world size: bench scaling JSON")
@click.option("--run", "run_dir", default=None,
              help="step, checkpoint and recovery times from a run's output_dir")
@click.option("--tokens-per-s-per-node", type=float, default=None,
              help="step time from a throughput (scaled linearly with nodes)")
@click.option("--recovery", default=None, help="benchmarks/elastic_recovery.py results JSON")
@click.option("--recovery-s", "recovery_s", multiple=True,
              help="KIND=SECONDS for start, join, notice, hard_loss, restart")
@click.option("--checkpoint-s", type=float, default=None)
@click.option("--instance-type", default=None, help="prices from cost.prices / prices.yaml")
@click.option("--notice-s", type=float, default=120.0, show_default=True,
              help="warning before a count trace's node goes (AWS: 120)")
@click.option("--seed", type=int, default=0, help="which nodes a count trace's fall removes")
@click.option("--out", "out_dir", default=None, help="default: OUTPUT_DIR/simulate/TRACE")
@click.option("--json", "as_json", is_flag=True)
def simulate(config: str, trace_path: str, policies: str, steps: int | None,
             scaling: str | None, run_dir: str | None, tokens_per_s_per_node: float | None,
             recovery: str | None, recovery_s: tuple[str, ...], checkpoint_s: float | None,
             instance_type: str | None, notice_s: float, seed: int, out_dir: str | None,
             as_json: bool) -> None:
    """Compare elastic_ft, plain restart, waiting and on-demand on a spot trace."""
    from elastic_ft.config import ConfigError, load_config
    from elastic_ft.report.prices import load_prices, price_node
    from elastic_ft.sim.calibration import calibrate
    from elastic_ft.sim.compare import compare, table, write
    from elastic_ft.sim.policies import POLICIES, Job
    from elastic_ft.sim.traces import load_trace

    try:
        cfg = load_config(config)
    except ConfigError as error:
        raise click.ClickException(str(error)) from None
    chosen = tuple(p.strip() for p in policies.split(",") if p.strip())
    unknown = [p for p in chosen if p not in POLICIES]
    if unknown:
        raise click.BadParameter(f"{unknown}: policies are {', '.join(POLICIES)}",
                                 param_hint="--policy")
    steps = steps or cfg.train.max_steps
    if not steps:
        raise click.ClickException("simulate: the config has no train.max_steps; give --steps")
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    try:
        trace = load_trace(trace_path, notice_s=notice_s, seed=seed, cap=cfg.workers.max)
        cal = calibrate(scaling, run_dir, recovery, tokens_per_s_per_node, tokens_per_step,
                        checkpoint_s, _recovery_overrides(recovery_s))
        spot = on_demand = None
        if instance_type:
            table_ = load_prices(cfg.cost.prices)
            spot = price_node(table_, instance_type, None, 0, "spot").per_h
            on_demand = price_node(table_, instance_type, None, 0, "on-demand").per_h
            if spot is None and on_demand is None:
                raise ValueError(f"instance type {instance_type!r} has no price in cost.prices "
                                 f"or the shipped table; add it to cost.prices")
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise click.ClickException(str(error)) from None
    job = Job(steps, cfg.workers.min, cfg.workers.max, cfg.checkpoint.every_steps,
              tokens_per_step)
    result = compare(trace, job, cal, spot, on_demand, chosen)
    out = Path(out_dir) if out_dir else Path(cfg.output_dir) / "simulate" / trace.name
    paths = write(result, out)
    if as_json:
        click.echo(json.dumps({k: v for k, v in result.items() if k != "timelines"}, indent=2))
    else:
        click.echo(table(result))
        click.echo(f"written: {paths['json']}, {paths['table']}, {paths['plot']}")
