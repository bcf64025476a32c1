"""The cost report of a real fake-node run through a join, a drain and a hard loss.

Nodes carry Ray's labels as a cloud sets them: the head and node A on demand, B and C spot, at
different prices from `cost.prices`. Every figure of `cost_report.json` is recomputed here by
hand from `events.jsonl` and `metrics.jsonl`.
"""

from __future__ import annotations

import json

import pytest

from elastic_ft.config import load_config
from elastic_ft.testing.fake_nodes import WORKER_RESOURCES, BackgroundRun, FakeNodeCluster
from tests.conftest import ROOT, placement_tries

pytestmark = pytest.mark.ray

MARKET, GROUP = "ray.io/market-type", "ray.io/node-group"
PRICES = {"instances": {"head-box": {"on_demand": 0.5},
                        "od-box": {"on_demand": 3.0},
                        "spot-box": {"on_demand": 3.0, "spot": 1.0}}}
STEPS, EVERY = 150, 50
SLOW = {"ELASTIC_FT_FAULT_SLOWDOWN": "3"}  # documented fault injection: steps long enough


def _of(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["event"] == name]


def test_cost_report_of_a_run_through_join_drain_and_hard_loss(tiny_assets, tmp_path) -> None:
    cluster = FakeNodeCluster(num_nodes=0, head_labels={GROUP: "head-box", MARKET: "on-demand"})
    try:
        cluster.add_node(SLOW, {GROUP: "od-box", MARKET: "on-demand"})
        out = tmp_path / "run"
        cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
            "model.name_or_path": str(tiny_assets), "output_dir": str(out),
            "workers.min": 1, "workers.max": 2, "workers.resources_per_worker": WORKER_RESOURCES,
            "workers.resize_interval_s": 2, "workers.start_timeout_s": 10,
            "elastic.monitor_interval_s": 0.5, "elastic.restart_wait_s": 20,
            "train.max_steps": STEPS, "checkpoint.every_steps": EVERY, "cost.prices": PRICES})
        run = BackgroundRun(cfg)

        def steps_at(world: int, n: int, what: str) -> None:
            seen = sum(m["world_size"] == world for m in run.metrics())
            run.wait_until(lambda r: sum(m["world_size"] == world for m in r.metrics())
                           >= seen + n, 180, what)

        steps_at(1, 3, "3 steps on node A")
        spot_b = cluster.add_node(SLOW, {GROUP: "spot-box", MARKET: "spot"})  # join
        steps_at(2, 3, "grow to 2 workers")
        jits = len(_of(run.events(), "jit_checkpoint"))
        cluster.drain_node(spot_b, deadline_s=30)  # drain: notice, checkpoint, node goes
        run.wait_until(lambda r: len(_of(r.events(), "jit_checkpoint")) > jits, 60, "jit")
        cluster.remove_node(spot_b)
        steps_at(1, 3, "shrink to 1 worker")
        spot_c = cluster.add_node(SLOW, {GROUP: "spot-box", MARKET: "spot"})
        steps_at(2, 3, "grow to 2 workers again")
        run.wait_until(lambda r: r.metrics()[-1]["step"] % EVERY >= 5, 60, "past a checkpoint")
        cluster.remove_node(spot_c, hard=True)  # hard loss: the steps since it are redone
        summary = run.join(400)
    finally:
        cluster.shutdown()

    events, metrics = run.events(), run.metrics()
    report = json.loads((out / "cost_report.json").read_text())
    assert summary["steps"] == STEPS == report["steps"]

    # nodes: what each was, when it was in the run, its price
    t0 = _of(events, "run_start")[0]["t"]
    t1 = _of(events, "run_end")[0]["t"]
    joins, losts = _of(events, "node_join"), _of(events, "node_lost")
    assert len(joins) == 2 and len(losts) == 2
    by_id = {n["node_id"]: n for n in report["nodes"]}
    assert len(by_id) == 4
    expected_h = {e["node_id"]: (e["t"] - joins[i]["t"]) / 3600 for i, e in enumerate(losts)}
    for node in report["nodes"]:
        if node["node_id"] in expected_h:  # B and C: spot, from their join to their loss
            assert (node["market"], node["price_per_h"]) == ("spot", 1.0)
            assert node["hours"] == pytest.approx(expected_h[node["node_id"]], abs=1e-6)
        else:  # head and A: on demand for the whole run
            assert node["market"] == "on-demand" and node["price_per_h"] in (0.5, 3.0)
            assert node["hours"] == pytest.approx((t1 - t0) / 3600, abs=1e-6)
        assert node["cost"] == pytest.approx(node["hours"] * node["price_per_h"])
    spot_h = sum(expected_h.values())
    whole_h = (t1 - t0) / 3600
    assert report["cost"] == pytest.approx(whole_h * 3.5 + spot_h * 1.0, rel=1e-6)
    assert report["on_demand_cost"] == pytest.approx(whole_h * 3.5 + spot_h * 3.0, rel=1e-6)
    assert report["paid_node_hours"] == pytest.approx(2 * whole_h + spot_h, rel=1e-6)
    assert not report["unpriced_nodes"]

    # steps: the ones redone after the hard loss are lost, the rest productive
    last_t = {}
    for m in metrics:
        last_t[m["step"]] = m["t"]
    lost = [m for m in metrics if last_t[m["step"]] != m["t"]]
    resume = _of(events, "resume")[-1]
    assert lost and report["lost_steps"] == len(lost)
    assert {m["step"] for m in lost} == set(range(resume["step"] + 1, max(
        m["step"] for m in lost) + 1))
    assert report["seconds"]["productive"] == pytest.approx(
        sum(m["step_s"] for m in metrics if last_t[m["step"]] == m["t"]), abs=0.01)
    assert report["seconds"]["lost"] == pytest.approx(sum(m["step_s"] for m in lost), abs=0.01)
    assert report["tokens"] == summary["tokens"]
    assert report["seconds"]["checkpoint"] == pytest.approx(
        sum(e["seconds"] for e in _of(events, "checkpoint")), abs=0.05)
    # four restarts (join, drain, join, hard loss), never short of workers.min nodes
    assert len(_of(events, "resume")) == 4 and report["seconds"]["waiting"] == 0

    # every group start's timeline (issue 21): from the change to the first step, phase by phase
    recoveries = _of(events, "recovery")
    assert len(recoveries) == 5 and recoveries[0]["trigger"] == "start"
    assert recoveries[1]["trigger"] == "join" and recoveries[2]["trigger"] in ("drain",
                                                                               "preempting")
    assert recoveries[4]["trigger"] in ("node_lost", "restarting")
    for r in recoveries:
        names = [p["phase"] for p in r["phases"]]
        assert {"imported", "model_loaded", "data_stream_opened"} <= set(names)
        assert names[-1] == "first_step" and r["total_s"] > 0
        assert sum(p["s"] for p in r["phases"]) == pytest.approx(r["total_s"], abs=0.01)
    for r in recoveries[1:]:
        assert {"old_group_stopped", "new_workers_started", "checkpoint_loaded"} <= {
            p["phase"] for p in r["phases"]}
    # no step runs between a new group's plan and its first step: that much is recovery at least
    setup_s = sum(r["phases"][-1]["t"] - next(p["t"] for p in r["phases"]
                                              if p["phase"] == "planned_by_controller")
                  for r in recoveries[1:])
    assert report["seconds"]["recovery"] > setup_s > 4 * 0.5, (report["seconds"], setup_s)
    # each new group placed at the first try: neither the draining node nor the lost one was
    # counted (resources/restart_gate.py)
    assert [n for _, n in placement_tries(events)] == [1, 1, 1, 1], placement_tries(events)
    assert report["recoveries"] == [{k: r[k] for k in ("trigger", "world_size", "step",
                                                       "total_s", "phases")}
                                    for r in recoveries]

    # the parts add up to the paid time; goodput is the productive share of node-time
    assert report["reconciliation"]["ok"], report["reconciliation"]
    assert sum(report["seconds"].values()) == pytest.approx(t1 - t0, abs=0.01)
    assert sum(report["node_hours"].values()) == pytest.approx(report["paid_node_hours"],
                                                               rel=1e-6)
    assert report["goodput"] == pytest.approx(
        report["node_hours"]["productive"] / report["paid_node_hours"])
    assert 0 < report["goodput"] < 1
    assert report["cost_per_million_tokens"] == pytest.approx(
        report["cost"] / (report["tokens"] / 1e6))
