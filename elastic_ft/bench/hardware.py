"""What a benchmark ran on: GPUs through NVML, CPU model and cores, versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpus() -> list[dict[str, Any]]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    found = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        name = pynvml.nvmlDeviceGetName(handle)
        found.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                      "mem_total_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)})
    return found


def git_commit() -> str | None:
    done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    return done.stdout.strip() or None


def hardware_record() -> dict[str, Any]:
    import ray
    import torch

    found = gpus()
    return {"cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "gpus": found,
            "gpu_count": len(found), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "commit": git_commit()}


def hardware_tag(record: dict[str, Any]) -> str:
    if record["gpus"]:
        return f"{record['gpu_count']}x{record['gpus'][0]['name']}".replace(" ", "_")
    return f"cpu-{record['cpu_cores']}core"
