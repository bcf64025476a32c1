"""`cost_report.json` and `elastic-ft report`: what a run cost, and what preemptions cost it.

Every node the run saw is priced (prices.py) over the time it was in the run; the run's wall
clock is cut into what it went to (timeline.py), and each part is weighted by the nodes paid
meanwhile: node-hours and dollars per category, goodput (the productive share of paid
node-time), lost steps, the same nodes on demand, and dollars per million trained tokens.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from elastic_ft.events import read_events, read_steps
from elastic_ft.report.prices import load_prices, market_of, price_node
from elastic_ft.report.timeline import CATEGORIES, build_timeline, seconds_by_category

RECONCILE_TOLERANCE = 0.01  # the parts must add up to the paid time within 1%


@dataclass
class NodeCost:
    node_id: str
    accelerator: str | None
    devices: int
    node_group: str | None
    market: str
    joined_t: float
    left_t: float
    hours: float
    price_per_h: float | None
    on_demand_per_h: float | None
    cost: float | None
    price_key: str | None
    price_source: str | None


@dataclass
class CostReport:
    running: bool
    wall_s: float
    steps: int
    lost_steps: int
    tokens: int
    paid_node_hours: float
    cost: float | None  # priced nodes only; None when no node is priced
    on_demand_cost: float | None
    savings_vs_on_demand: float | None  # share of the on-demand cost not paid
    cost_per_million_tokens: float | None
    goodput: float  # productive node-time / paid node-time
    unpriced_nodes: list[str]
    seconds: dict[str, float]  # wall clock per category
    node_hours: dict[str, float]  # node-time per category (sums to paid_node_hours)
    cost_by: dict[str, float]  # dollars per category (priced nodes)
    reconciliation: dict[str, Any]
    nodes: list[NodeCost]
    recoveries: list[dict[str, Any]]  # each group's `recovery` event: what its start took

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        def money(x: float | None) -> str:
            return "unpriced" if x is None else f"${x:,.2f}"

        state = "running" if self.running else "finished"
        lines = [f"run ({state}): {self.wall_s / 3600:.3f} h wall, {self.steps} steps, "
                 f"{self.lost_steps} lost step(s) redone, {self.tokens:,} tokens",
                 f"paid: {self.paid_node_hours:.3f} node-h, {money(self.cost)} "
                 f"(on demand: {money(self.on_demand_cost)})"
                 + (f", {self.savings_vs_on_demand:.0%} saved"
                    if self.savings_vs_on_demand is not None else ""),
                 f"goodput {self.goodput:.1%}; per million tokens "
                 f"{money(self.cost_per_million_tokens)}",
                 "", f"{'time went to':<12} {'wall s':>9} {'node-h':>8} {'cost':>10}"]
        for c in CATEGORIES:
            if self.seconds[c] > 0:
                lines.append(f"{c:<12} {self.seconds[c]:>9.1f} {self.node_hours[c]:>8.4f} "
                             f"{money(self.cost_by[c]) if self.cost is not None else '-':>10}")
        r = self.reconciliation
        lines.append(f"reconciled: parts {r['accounted_s']:.1f} s of {r['paid_s']:.1f} s "
                     f"({r['error_share']:.2%} apart, {'ok' if r['ok'] else 'NOT within 1%'})")
        lines += ["", f"{'node':<14} {'type':<18} {'market':<9} {'in run h':>8} "
                  f"{'$/h':>8} {'cost':>10}"]
        for n in self.nodes:
            kind = n.node_group or f"{n.devices}x {n.accelerator}"
            rate = "-" if n.price_per_h is None else f"{n.price_per_h:.3f}"
            lines.append(f"{n.node_id[:12]:<14} {kind[:18]:<18} {n.market:<9} "
                         f"{n.hours:>8.4f} {rate:>8} {money(n.cost):>10}")
        if self.unpriced_nodes:
            lines.append(f"{len(self.unpriced_nodes)} node(s) unpriced: add their instance "
                         f"or accelerator type to cost.prices")
        if self.recoveries:
            lines += ["", "group starts (change -> first step; the longest phases):"]
        for r in self.recoveries:
            longest = sorted(r["phases"], key=lambda p: -p["s"])[:4]
            lines.append(f"  {r['trigger']:<10} -> {r['world_size']} worker(s) at step "
                         f"{r['step']}: {r['total_s']:.1f} s ("
                         + ", ".join(f"{p['phase']} {p['s']:.1f}" for p in longest) + ")")
        return "\n".join(lines)


def cost_report(events: list[dict[str, Any]], metrics: list[dict[str, Any]],
                prices: dict[str, Any] | str | None = None, market: str = "on-demand",
                now: float | None = None) -> CostReport:
    timeline = build_timeline(events, metrics, now)
    table = load_prices(prices)
    nodes = []
    for span in timeline.nodes:
        node_market = market_of(span.market_label, market)
        price = price_node(table, span.node_group, span.accelerator, span.devices, node_market)
        hours = max(0.0, span.left_t - span.joined_t) / 3600
        nodes.append(NodeCost(
            span.node_id, span.accelerator, span.devices, span.node_group, node_market,
            span.joined_t, span.left_t, hours, price.per_h, price.on_demand_per_h,
            None if price.per_h is None else hours * price.per_h, price.key, price.source))
    node_s = dict.fromkeys(CATEGORIES, 0.0)
    cost_by = dict.fromkeys(CATEGORIES, 0.0)
    for a, b, label in timeline.intervals:
        for n in nodes:
            overlap = min(b, n.left_t) - max(a, n.joined_t)
            if overlap > 0:
                node_s[label] += overlap
                cost_by[label] += overlap / 3600 * (n.price_per_h or 0.0)
    priced = [n for n in nodes if n.cost is not None]
    cost = sum(n.cost for n in priced) if priced else None  # type: ignore[misc]
    on_demand = (sum(n.hours * n.on_demand_per_h for n in nodes)  # type: ignore[operator]
                 if nodes and all(n.on_demand_per_h is not None for n in nodes) else None)
    paid_node_s = sum(node_s.values())
    seconds = seconds_by_category(timeline)
    return CostReport(
        running=timeline.running, wall_s=sum(b - a for a, b in timeline.windows),
        steps=timeline.steps, lost_steps=timeline.lost_steps, tokens=timeline.tokens,
        paid_node_hours=sum(n.hours for n in nodes), cost=cost, on_demand_cost=on_demand,
        savings_vs_on_demand=(1 - cost / on_demand) if cost is not None and on_demand
        and len(priced) == len(nodes) else None,
        cost_per_million_tokens=cost / (timeline.tokens / 1e6)
        if cost is not None and timeline.tokens else None,
        goodput=node_s["productive"] / paid_node_s if paid_node_s else 0.0,
        unpriced_nodes=[n.node_id for n in nodes if n.cost is None],
        seconds={k: round(v, 3) for k, v in seconds.items()},
        node_hours={k: v / 3600 for k, v in node_s.items()},
        cost_by=cost_by, reconciliation=_reconcile(timeline, seconds), nodes=nodes,
        recoveries=[{k: e[k] for k in ("trigger", "world_size", "step", "total_s", "phases")}
                    for e in events if e["event"] == "recovery"])


def _reconcile(timeline: Any, seconds: dict[str, float]) -> dict[str, Any]:
    """Steps, checkpoints and evals as the workers measured them, plus the gaps between
    groups, against the paid wall time: a second counted twice (a checkpoint inside a step)
    or unexplained (slow per-step reporting: `other`) moves them apart."""
    paid_s = sum(b - a for a, b in timeline.windows)
    measured = timeline.measured_s
    accounted = sum(measured[c] for c in ("productive", "lost", "checkpoint", "eval")) + sum(
        seconds[c] for c in ("recovery", "waiting", "startup", "shutdown"))
    error = abs(paid_s - accounted) / paid_s if paid_s else 0.0
    return {"paid_s": round(paid_s, 3), "accounted_s": round(accounted, 3),
            "unexplained_s": round(seconds["other"], 3), "error_share": round(error, 5),
            "ok": error <= RECONCILE_TOLERANCE}


def report_for_run(out: str | Path, now: float | None = None) -> CostReport:
    """The cost report of the run in OUTPUT, finished or running (its own saved config)."""
    out = Path(out)
    events = read_events(out / "events.jsonl")
    if not any(e["event"] == "run_start" for e in events):
        raise FileNotFoundError(f"{out}: no run here (no run_start in events.jsonl); give the "
                                f"run's output_dir")
    saved = out / "config.yaml"
    cost_cfg = (yaml.safe_load(saved.read_text()) or {}).get("cost") or {} \
        if saved.exists() else {}
    last_start = max(e["t"] for e in events if e["event"] == "run_start")
    running = not any(e["event"] in ("run_end", "run_failed") and e["t"] >= last_start
                      for e in events)
    return cost_report(events, read_steps(out / "metrics.jsonl"), cost_cfg.get("prices"),
                       cost_cfg.get("market") or "on-demand",
                       now=(now or time.time()) if running else None)


def write_cost_report(out: str | Path) -> CostReport:
    report = report_for_run(out)
    (Path(out) / "cost_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report
