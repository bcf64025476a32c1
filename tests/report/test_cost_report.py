"""The cost report over a hand-written run log, each figure worked out by hand below.

The run: head H, on-demand A and spot B at the start (workers.min 2); 4 steps, a checkpoint,
2 steps, then B is lost with no warning; 13 s with one node that can host a worker (waiting
for capacity) until spot C joins; the new group resumes at step 4 (steps 5-6 redone), trains to
step 8, evaluates, and the run ends at t = 1042.
"""

from __future__ import annotations

import pytest

from elastic_ft.report.cost import cost_report
from elastic_ft.report.timeline import build_timeline

PRICES = {"instances": {"head": {"on_demand": 0.36}, "od": {"on_demand": 3.6},
                        "spot": {"on_demand": 3.6, "spot": 1.8}}}


def _node(node_id: str, group: str, market: str | None) -> dict:
    return {"node_id": node_id, "accelerator": "cpu", "gpus": 0, "node_group": group,
            "market": market}


def _step(step: int, t: float, world: int = 2) -> dict:
    return {"step": step, "t": t, "step_s": 1.0, "loss": 1.0, "world_size": world,
            "trained_real_tokens": 100}


def _log(c_group: str = "spot") -> tuple[list[dict], list[dict]]:
    events = [
        {"event": "run_start", "t": 1000.0, "min_workers": 2},
        {"event": "inventory", "t": 1001.0, "nodes": [
            _node("H", "head", None), _node("A", "od", "on-demand"), _node("B", "spot", "spot")]},
        {"event": "start", "t": 1009.0, "nodes": ["A", "B"]},
        {"event": "checkpoint", "t": 1014.5, "seconds": 0.5, "step": 4},
        {"event": "node_lost", "t": 1017.0, "node_id": "B"},
        {"event": "node_join", "t": 1030.0, **_node("C", c_group, "spot")},
        {"event": "start", "t": 1034.0, "nodes": ["A", "C"]},
        {"event": "resume", "t": 1034.5, "step": 4},
        {"event": "recovery", "t": 1036.0, "trigger": "node_lost", "world_size": 2, "step": 5,
         "total_s": 19.0, "phases": [{"phase": "model_loaded", "t": 1030.0, "s": 13.0},
                                     {"phase": "first_step", "t": 1036.0, "s": 6.0}]},
        {"event": "eval", "t": 1039.5, "seconds": 0.5, "step": 8},
        {"event": "run_end", "t": 1042.0},
    ]
    metrics = [_step(s, 1010.0 + s) for s in (1, 2, 3, 4)]
    metrics += [_step(5, 1015.5), _step(6, 1016.5)]  # redone after the loss: lost
    metrics += [_step(s, 1031.0 + s) for s in (5, 6, 7, 8)]
    return events, metrics


def test_every_second_and_dollar_of_a_run_with_a_loss_and_a_wait() -> None:
    events, metrics = _log()
    report = cost_report(events, metrics, PRICES)
    assert report.seconds == {"productive": 8.0, "lost": 2.0, "checkpoint": 0.5, "eval": 0.5,
                              "recovery": 5.5, "waiting": 13.0, "startup": 10.0,
                              "shutdown": 2.5, "other": 0.0}
    assert report.wall_s == 42.0
    assert (report.steps, report.lost_steps, report.tokens) == (8, 2, 800)
    hours = {n.node_id: n.hours * 3600 for n in report.nodes}
    assert hours == pytest.approx({"H": 42, "A": 42, "B": 17, "C": 12})
    markets = {n.node_id: (n.market, n.price_per_h) for n in report.nodes}
    assert markets == {"H": ("on-demand", 0.36), "A": ("on-demand", 3.6),
                       "B": ("spot", 1.8), "C": ("spot", 1.8)}
    cost = (42 * 0.36 + 42 * 3.6 + 17 * 1.8 + 12 * 1.8) / 3600
    assert report.cost == pytest.approx(cost)
    assert report.on_demand_cost == pytest.approx((42 * 0.36 + 42 * 3.6 + 29 * 3.6) / 3600)
    assert report.savings_vs_on_demand == pytest.approx(1 - cost / report.on_demand_cost)
    # productive: 4 s with H, A, B and 4 s with H, A, C = 24 node-s of 113 paid
    assert report.paid_node_hours * 3600 == pytest.approx(113)
    assert report.node_hours["productive"] * 3600 == pytest.approx(24)
    assert report.goodput == pytest.approx(24 / 113)
    # waiting: 13 s while H and A were alive (B gone, C not yet there)
    assert report.node_hours["waiting"] * 3600 == pytest.approx(26)
    assert report.cost_by["waiting"] == pytest.approx(13 * (0.36 + 3.6) / 3600)
    assert sum(report.cost_by.values()) == pytest.approx(cost)
    assert report.cost_per_million_tokens == pytest.approx(cost / 800e-6)
    assert report.reconciliation["ok"] and report.reconciliation["error_share"] < 1e-9
    assert "waiting" in report.table() and "unpriced" not in report.table()
    assert [r["trigger"] for r in report.recoveries] == ["node_lost"]
    assert "node_lost  -> 2 worker(s) at step 5: 19.0 s (model_loaded 13.0" in report.table()


def test_an_unknown_type_is_unpriced_not_guessed() -> None:
    events, metrics = _log(c_group="mystery-box")
    report = cost_report(events, metrics, PRICES)
    assert report.unpriced_nodes == ["C"]
    assert report.cost == pytest.approx((42 * 0.36 + 42 * 3.6 + 17 * 1.8) / 3600)
    assert report.on_demand_cost is None and report.savings_vs_on_demand is None
    assert "1 node(s) unpriced" in report.table()


def test_a_step_counted_twice_fails_the_reconciliation() -> None:
    events, metrics = _log()
    metrics[3]["step_s"] = 3.0  # step 4 claims the 2 s of steps 2-3 as well
    report = cost_report(events, metrics, PRICES)
    assert not report.reconciliation["ok"]


def test_a_killed_driver_and_a_re_run_are_two_windows_and_a_running_run_ends_now() -> None:
    events = [{"event": "run_start", "t": 0.0}, {"event": "start", "t": 5.0, "nodes": ["A"]},
              {"event": "run_start", "t": 100.0}, {"event": "start", "t": 105.0, "nodes": ["A"]}]
    metrics = [_step(1, 10.0, 1), _step(2, 11.0, 1), _step(2, 111.0, 1)]
    timeline = build_timeline(events, metrics, now=130.0)
    assert timeline.windows == [(0.0, 11.0), (100.0, 130.0)] and timeline.running
    assert (timeline.steps, timeline.lost_steps) == (2, 1)
    assert build_timeline(events, metrics).windows[-1] == (100.0, 111.0)


def test_shipped_prices_name_their_source_and_a_config_entry_overrides() -> None:
    from elastic_ft.report.prices import load_prices, market_of, price_node

    table = load_prices(None)
    for kind in ("instances", "accelerators"):
        for name, entry in table[kind].items():
            assert entry["source"] and entry["date"], name
    v100 = price_node(table, None, "V100", 8, "spot")
    assert v100.per_h == pytest.approx(8 * 0.92) and v100.on_demand_per_h == pytest.approx(24.48)
    assert price_node(table, "p4d.24xlarge", "A100", 8, "spot").per_h is None  # no spot figure
    mine = load_prices({"instances": {"p3.2xlarge": {"spot": 0.5}}})
    assert price_node(mine, "p3.2xlarge", None, 1, "spot").per_h == 0.5
    assert market_of("ON_DEMAND", "spot") == "on-demand" and market_of(None, "spot") == "spot"
