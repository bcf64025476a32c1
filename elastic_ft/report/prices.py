"""Prices per hour of the nodes a run used: the shipped table (prices.yaml) under the config's.

A node is priced by its instance type (the `ray.io/node-group` label) or else by its
accelerator type times its device count, in its market (`ray.io/market-type`, else
`cost.market`). A type or market the tables do not list stays unpriced: no figure is guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SHIPPED = Path(__file__).with_name("prices.yaml")


@dataclass(frozen=True)
class NodePrice:
    per_h: float | None  # in the node's own market; None: unpriced
    on_demand_per_h: float | None  # what the same node costs on demand
    key: str | None  # the table entry used ("instances/p3.2xlarge", "accelerators/V100")
    source: str | None


def market_of(label: str | None, default: str) -> str:
    """`ray.io/market-type` values ("spot", "on-demand", "ON_DEMAND", ...) -> spot | on-demand."""
    value = (label or default).strip().lower().replace("_", "-")
    return "spot" if value == "spot" else "on-demand"


def load_prices(prices: dict[str, Any] | str | None) -> dict[str, dict[str, dict[str, Any]]]:
    """The shipped table with the config's entries (a mapping or a YAML file) laid over it."""
    table = yaml.safe_load(SHIPPED.read_text())
    if isinstance(prices, str):
        path = Path(prices)
        if not path.exists():
            raise FileNotFoundError(f"cost.prices: price file {path} not found; give a YAML "
                                    f"file with 'instances' and/or 'accelerators'")
        prices = yaml.safe_load(path.read_text()) or {}
        unknown = set(prices) - {"instances", "accelerators"}
        if unknown:
            raise ValueError(f"cost.prices: {path} has {sorted(unknown)}; it takes the keys "
                             f"'instances' and 'accelerators'")
    for kind, entries in (prices or {}).items():
        for name, entry in (entries or {}).items():
            fields = entry.model_dump(exclude_none=True) if hasattr(entry, "model_dump") \
                else dict(entry)
            table.setdefault(kind, {})[name] = {"source": "config cost.prices", **fields}
    return table


def price_node(table: dict[str, dict[str, dict[str, Any]]], node_group: str | None,
               accelerator: str | None, devices: int, market: str) -> NodePrice:
    field = "spot" if market == "spot" else "on_demand"
    instance = (table.get("instances") or {}).get(node_group or "")
    if instance is not None:
        return NodePrice(instance.get(field), instance.get("on_demand"),
                         f"instances/{node_group}", instance.get("source"))
    device = (table.get("accelerators") or {}).get(accelerator or "")
    if device is not None and devices > 0:
        def times(x: float | None) -> float | None:
            return None if x is None else x * devices

        return NodePrice(times(device.get(field)), times(device.get("on_demand")),
                         f"accelerators/{accelerator}", device.get("source"))
    return NodePrice(None, None, None, None)
