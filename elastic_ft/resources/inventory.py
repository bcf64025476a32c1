"""What each node has (its monitor's inventory) and what each rank may use: pure functions.

A rank's memory budget comes from its own device: the GPU it was given (NVML's total on its
node, or the CUDA total the rank itself reads), or on CPU its node's RAM shared by the ranks
there. Never from the driver, which on a cluster is usually a CPU head node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Ray's node labels (set by the cluster launcher, KubeRay or `ray start --labels`)
LABEL_ACCELERATOR = "ray.io/accelerator-type"
LABEL_MARKET = "ray.io/market-type"
LABEL_NODE_GROUP = "ray.io/node-group"
# Fault injection, documented in the README: this node's devices hold this many bytes, for
# planning, as if the device were that small (read by the node's ResourceMonitor).
NODE_BUDGET_ENV = "ELASTIC_FT_NODE_MEM_BUDGET_BYTES"


@dataclass(frozen=True)
class RankPlace:
    """Where a rank runs, as the rank itself reports it at group start."""

    node_id: str
    gpu_ids: tuple[str, ...] = ()
    cuda_total_bytes: int | None = None  # torch's figure for the rank's own device
    # the rank's own view of its node, for a node whose monitor has not reported yet (a
    # group can start on a node that joined a moment ago)
    node_mem_bytes: int | None = None
    budget_override_bytes: int | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RankPlace:
        return cls(raw["node_id"], tuple(str(g) for g in raw.get("gpu_ids") or ()),
                   raw.get("cuda_total_bytes"), raw.get("node_mem_bytes"),
                   raw.get("budget_override_bytes"))


def accelerator_type(sample: dict[str, Any]) -> str:
    """The node's device type: its label, else its first GPU's NVML name, else "cpu"."""
    labels = sample.get("labels") or {}
    if labels.get(LABEL_ACCELERATOR):
        return str(labels[LABEL_ACCELERATOR])
    gpus = sample.get("gpus") or []
    return str(gpus[0]["name"]) if gpus else "cpu"


def inventory_row(sample: dict[str, Any]) -> dict[str, Any]:
    """The parts of a monitor's sample that describe the node (for events and the terminal)."""
    labels = sample.get("labels") or {}
    gpus = sample.get("gpus") or []
    return {"node_id": sample["node_id"], "accelerator": accelerator_type(sample),
            "gpus": len(gpus),
            "gpu_mem_bytes": [g["mem_total_bytes"] for g in gpus],
            "gpu_free_bytes": [g["mem_total_bytes"] - g["mem_used_bytes"] for g in gpus],
            "cpus": sample.get("cpu_count"), "mem_bytes": sample.get("mem_total_bytes"),
            "market": labels.get(LABEL_MARKET), "node_group": labels.get(LABEL_NODE_GROUP),
            "mem_budget_override_bytes": sample.get("mem_budget_override_bytes"),
            "labels": {k: v for k, v in labels.items() if k != "ray.io/node-id"}}


def rank_budget_bytes(place: RankPlace, sample: dict[str, Any] | None, ranks_on_node: int,
                      use_gpu: bool, mem_fraction: float, mem_cap_bytes: int | None) -> int:
    """This rank's memory budget, from its own device.

    Order: the config's `train.mem_cap_bytes`; the node's fault-injection override; on GPU the
    smallest of the rank's devices (NVML on its node, else the rank's own CUDA figure) times
    `mem_fraction`; on CPU the node's RAM times `mem_fraction`, shared by its ranks.
    """
    if mem_cap_bytes:
        return int(mem_cap_bytes)
    sample = sample or {"mem_total_bytes": place.node_mem_bytes,
                        "mem_budget_override_bytes": place.budget_override_bytes}
    override = sample.get("mem_budget_override_bytes")
    if override:
        return int(override)
    if use_gpu:
        by_index = {str(g["index"]): int(g["mem_total_bytes"]) for g in sample.get("gpus") or []}
        totals = [by_index[g] for g in place.gpu_ids if g in by_index]
        if not totals and place.cuda_total_bytes:
            totals = [int(place.cuda_total_bytes)]
        if not totals and by_index:
            totals = [min(by_index.values())]
        if not totals:
            raise ValueError(f"node {place.node_id[:12]} reports no GPU memory (NVML) and the "
                             "rank none from CUDA; set train.mem_cap_bytes")
        return int(min(totals) * mem_fraction)
    mem_total = sample.get("mem_total_bytes")
    if not mem_total:
        raise ValueError(f"no memory figure from node {place.node_id[:12]}'s monitor yet")
    return int(int(mem_total) * mem_fraction / max(1, ranks_on_node))


def rank_device_type(place: RankPlace, sample: dict[str, Any] | None, use_gpu: bool) -> str:
    sample = sample or {}
    if not use_gpu:
        return "cpu"
    for gpu in sample.get("gpus") or []:
        if str(gpu["index"]) in place.gpu_ids:
            return str(gpu["name"])
    return accelerator_type(sample)


def render_inventory(rows: list[dict[str, Any]]) -> str:
    gib = 1024**3
    lines = [f"{'node':<14}{'device':<22}{'gpus':>5}{'GiB/gpu':>9}{'cpus':>6}{'RAM GiB':>9}"
             f"  market     group"]
    for r in rows:
        per_gpu = f"{min(r['gpu_mem_bytes']) / gib:.0f}" if r["gpu_mem_bytes"] else "-"
        if r.get("mem_budget_override_bytes"):
            per_gpu = f"{r['mem_budget_override_bytes'] / gib:.2f}*"
        lines.append(f"{r['node_id'][:12]:<14}{r['accelerator'][:21]:<22}{r['gpus']:>5}"
                     f"{per_gpu:>9}{r['cpus'] or 0:>6}{(r['mem_bytes'] or 0) / gib:>9.1f}  "
                     f"{r['market'] or '-':<10} {r['node_group'] or '-'}")
    if any(r.get("mem_budget_override_bytes") for r in rows):
        lines.append(f"* budget set by {NODE_BUDGET_ENV} (fault injection)")
    return "\n".join(lines)
