"""`ResourceMonitor`: one actor pinned to each node, sampling GPUs (NVML), CPU and RAM.

Each sample is also the node's inventory: device type and memory per GPU, CPU cores, RAM, the
node's Ray labels, and the fault-injection budget override (`ELASTIC_FT_NODE_MEM_BUDGET_BYTES`
in the node's environment). On a node with no NVML library or no GPU it logs one line and
reports CPU/RAM only.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

log = logging.getLogger("elastic_ft.monitor")


@dataclass
class GpuSample:
    index: int
    name: str
    mem_total_bytes: int
    mem_used_bytes: int
    util_pct: int
    temp_c: int
    power_w: float


@dataclass
class NodeSample:
    node_id: str
    t: float
    cpu_pct: float
    cpu_count: int
    mem_total_bytes: int
    mem_used_bytes: int
    gpus: list[GpuSample] = field(default_factory=list)
    nvml: str = "ok"
    labels: dict[str, str] = field(default_factory=dict)
    mem_budget_override_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NvmlReader:
    """NVML through `pynvml` (nvidia-ml-py); `available` is False where there is none."""

    def __init__(self) -> None:
        self.available = False
        self.status = "ok"
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.available = pynvml.nvmlDeviceGetCount() > 0
            if not self.available:
                self.status = "no GPU"
        except Exception as error:  # NVMLError_LibraryNotFound on a CPU box
            self.status = f"NVML unavailable ({type(error).__name__})"
        if not self.available:
            log.info("GPU monitoring off: %s; reporting CPU and RAM only", self.status)

    def sample(self) -> list[GpuSample]:
        if not self.available:
            return []
        nv = self._nvml
        gpus = []
        for i in range(nv.nvmlDeviceGetCount()):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            name = nv.nvmlDeviceGetName(h)
            gpus.append(GpuSample(
                index=i, name=name.decode() if isinstance(name, bytes) else name,
                mem_total_bytes=int(mem.total), mem_used_bytes=int(mem.used),
                util_pct=int(nv.nvmlDeviceGetUtilizationRates(h).gpu),
                temp_c=int(nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
                power_w=nv.nvmlDeviceGetPowerUsage(h) / 1000.0))
        return gpus


def node_labels() -> dict[str, str]:
    try:
        import ray

        return dict(ray.get_runtime_context().get_node_labels())
    except Exception:  # outside Ray (a unit test), or an old Ray
        return {}


def sample_node(node_id: str, nvml: NvmlReader, labels: dict[str, str] | None = None
                ) -> NodeSample:
    from elastic_ft.resources.inventory import NODE_BUDGET_ENV

    vm = psutil.virtual_memory()
    override = os.environ.get(NODE_BUDGET_ENV)
    return NodeSample(node_id=node_id, t=time.time(), cpu_pct=psutil.cpu_percent(interval=None),
                      cpu_count=psutil.cpu_count() or 1, mem_total_bytes=int(vm.total),
                      mem_used_bytes=int(vm.total - vm.available), gpus=nvml.sample(),
                      nvml=nvml.status, labels=labels or {},
                      mem_budget_override_bytes=int(override) if override else None)


class ResourceMonitor:
    """Ray actor body: samples its node every `interval_s` and pushes to the controller."""

    def __init__(self, node_id: str, controller: Any, interval_s: float,
                 preemption_urls: list[str] | None = None, preemption_poll_s: float = 2.0
                 ) -> None:
        import threading

        from elastic_ft.resources.preemption import resolve_urls

        self.node_id = node_id
        self.controller = controller
        self.interval_s = interval_s
        self.nvml = NvmlReader()
        self.labels = node_labels()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        self.preemption_urls = resolve_urls(preemption_urls or [])
        if self.preemption_urls:
            threading.Thread(target=self._watch_preemption, args=(preemption_poll_s,),
                             daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.controller.node_sample.remote(
                    sample_node(self.node_id, self.nvml, self.labels).to_dict())
            except Exception:  # controller gone: the run is over
                return
            self._stop.wait(self.interval_s)

    def _watch_preemption(self, poll_s: float) -> None:
        """Poll the cloud's metadata endpoints; report the first notice once."""
        from elastic_ft.resources.preemption import first_notice

        while not self._stop.wait(poll_s):
            notice = first_notice(self.preemption_urls, timeout_s=min(1.0, poll_s))
            if notice is not None:
                try:
                    self.controller.preemption_notice.remote(self.node_id, notice.to_dict())
                except Exception:
                    pass
                return

    def sample(self) -> dict[str, Any]:
        return sample_node(self.node_id, self.nvml, self.labels).to_dict()

    def stop(self) -> None:
        self._stop.set()
