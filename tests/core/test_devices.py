"""Per-device-type budgets and probe reuse, from the nodes' inventory (no Ray, no driver)."""

from __future__ import annotations

from elastic_ft.config import load_config
from elastic_ft.core.devices import budgets_by_type, workers_that_fit
from elastic_ft.core.memory import ModelShape
from elastic_ft.core.optimizer import MicroBatchCaps
from tests.conftest import ROOT

GIB = 1024**3


def _node(node_id: str, name: str, gib: int, gpus: int = 1) -> dict:
    return {"node_id": node_id, "mem_total_bytes": 64 * GIB, "cpu_count": 16,
            "gpus": [{"index": i, "name": name, "mem_total_bytes": gib * GIB,
                      "mem_used_bytes": 0} for i in range(gpus)]}


def test_one_probe_per_device_type_on_a_node_of_that_type(tmp_path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny-lora-cpu.yaml", {
        "model.name_or_path": str(tmp_path), "output_dir": str(tmp_path)})
    samples = {"a1": _node("a1", "NVIDIA A100-SXM4-40GB", 40, 8),
               "a2": _node("a2", "NVIDIA A100-SXM4-80GB", 80, 8),
               "l4": _node("l4", "NVIDIA L4", 24, 4),
               "head": {"node_id": "head", "mem_total_bytes": 8 * GIB, "gpus": []}}
    hosting = {"a1": 8, "a2": 8, "l4": 4}  # the CPU head hosts no worker
    budgets = budgets_by_type(cfg, True, hosting, samples)
    # one entry per type, the largest budget of that type, and a node that has it
    assert budgets == {"NVIDIA A100-SXM4-40GB": (int(40 * GIB * 0.9), "a1"),
                       "NVIDIA A100-SXM4-80GB": (int(80 * GIB * 0.9), "a2"),
                       "NVIDIA L4": (int(24 * GIB * 0.9), "l4")}
    # CPU workers: one type, the node's RAM shared by the workers it hosts
    cpu = budgets_by_type(cfg, False, {"l4": 4}, samples)
    assert cpu == {"cpu": (int(64 * GIB * 0.9 / 4), "l4")}
    assert workers_that_fit({"CPU": 8, "GPU": 4}, {"CPU": 1, "GPU": 1}) == 4
    assert workers_that_fit({"CPU": 8}, {"CPU": 1, "GPU": 1}) == 0


def test_probed_peaks_are_reused_against_each_nodes_budget() -> None:
    caps = MicroBatchCaps(ModelShape.__new__(ModelShape), {}, limit=64)
    caps.probed["NVIDIA L4"] = {1: 5 * GIB, 2: 9 * GIB, 4: 17 * GIB, 8: None}  # 8: OOM
    assert caps.cap("NVIDIA L4", 20 * GIB) == (4, "probe")
    assert caps.cap("NVIDIA L4", 10 * GIB) == (2, "probe")
    assert caps.cap("NVIDIA L4", 4 * GIB) == (0, "probe")
    caps.requested = 3
    assert caps.cap("NVIDIA L4", 20 * GIB) == (3, "probe")
