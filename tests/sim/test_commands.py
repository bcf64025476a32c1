"""`elastic-ft simulate` and `elastic-ft report` from the command line, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from elastic_ft.cli import main

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT / "benchmarks" / "spot-traces" / "preemption-4node-v100-aws-2023-08" / \
    "us-east-1f.json"
RECOVERY = ROOT / "benchmarks" / "results" / "cpu-2core" / "elastic_recovery.json"
CONFIG = ROOT / "configs" / "tiny-lora-cpu.yaml"


def _run_dir(tmp_path: Path) -> Path:
    """A finished run's files: two nodes, one spot; three 1 s steps, a checkpoint."""
    run = tmp_path / "run"
    run.mkdir()
    node = {"accelerator": "V100", "gpus": 1, "node_group": None}
    events = [{"event": "run_start", "t": 0.0},
              {"event": "inventory", "t": 0.5, "nodes": [
                  {"node_id": "a", "market": "spot", **node},
                  {"node_id": "b", "market": None, **node}]},
              {"event": "checkpoint", "t": 4.2, "step": 3, "seconds": 0.2, "mode": "async"},
              {"event": "run_end", "t": 3600.0}]
    metrics = [{"step": s, "loss": 1.0, "step_s": 1.0, "t": 1.0 + s, "world_size": 2,
                "trained_real_tokens": 1000} for s in (1, 2, 3)]
    (run / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in metrics) + "\n")
    (run / "config.yaml").write_text(yaml.safe_dump({"cost": {"market": "on-demand"}}))
    return run


def test_report_prices_a_run_from_its_own_files(tmp_path) -> None:
    run = _run_dir(tmp_path)
    result = CliRunner().invoke(main, ["report", str(run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    # V100 from the shipped table: a spot at $0.92/h, b (no label: cost.market) at $3.06/h
    assert report["cost"] == 0.92 + 3.06 and report["on_demand_cost"] == 2 * 3.06
    assert report["steps"] == 3 and report["reconciliation"]["ok"]
    table = CliRunner().invoke(main, ["report", str(run)])
    assert "goodput" in table.output and "$3.98" in table.output
    missing = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert missing.exit_code != 0 and "no run here" in missing.output


def test_simulate_writes_json_table_and_plot_for_every_policy(tmp_path) -> None:
    run = _run_dir(tmp_path)
    out = tmp_path / "sim"
    result = CliRunner().invoke(main, [
        "simulate", str(CONFIG), "--trace", str(TRACE), "--run", str(run), "--recovery",
        str(RECOVERY), "--instance-type", "p3.2xlarge", "--steps", "2000", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "Can't Be Late" in result.output  # the traces' paper is cited with the results
    saved = json.loads((out / "simulate.json").read_text())
    assert [r["policy"] for r in saved["rows"]] == ["elastic_ft", "restart", "wait",
                                                      "on_demand"]
    assert saved["prices"] == {"spot_per_h": 0.92, "on_demand_per_h": 3.06}
    assert "metrics.jsonl" in saved["calibration"]["sources"]["step_s"]
    assert (out / "simulate.png").stat().st_size > 10_000 and (out / "simulate.md").exists()
    on_demand = saved["rows"][-1]
    assert on_demand["finished"] and on_demand["cost_vs_on_demand"] == 1.0


def test_simulate_errors_name_the_fix(tmp_path) -> None:
    run = _run_dir(tmp_path)
    base = ["simulate", str(CONFIG), "--run", str(run), "--recovery", str(RECOVERY),
            "--out", str(tmp_path / "o")]
    bad_policy = CliRunner().invoke(main, base + ["--trace", str(TRACE), "--policy", "yolo"])
    assert bad_policy.exit_code != 0 and "policies are elastic_ft" in bad_policy.output
    no_trace = CliRunner().invoke(main, base + ["--trace", str(tmp_path / "none.json")])
    assert "not found" in no_trace.output
    no_price = CliRunner().invoke(main, base + ["--trace", str(TRACE), "--instance-type",
                                                "z9.huge"])
    assert "has no price" in no_price.output
    no_recovery = CliRunner().invoke(main, ["simulate", str(CONFIG), "--trace", str(TRACE),
                                            "--run", str(run)])
    assert "no recovery time" in no_recovery.output
