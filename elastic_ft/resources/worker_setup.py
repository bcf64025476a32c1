"""Ray's `worker_process_setup_hook` for the jobs elastic_ft starts: every worker process runs
`setup` once, in its main thread, before it takes any task or actor.

- SIGTERM becomes a preemption notice while the process trains (sigterm.py);
- a training worker's process (its runtime environment carries `warm_pool.WARM_ENV`) imports
  what a rank imports before it is handed an actor: a spare the controller asked the raylet to
  start ahead (warm_pool.py) is then ready when the next group starts. It lists itself as
  ready, and exits once the controller is gone while it is still idle (the run ended).

CUDA: Ray and Ray Train choose a rank's GPUs (CUDA_VISIBLE_DEVICES) when the actor starts,
after this hook, and CUDA reads them once, at its initialisation. So the imports here run with
DeepSpeed's accelerator named (no device probe) and torch's NVML-based availability check, and
afterwards the CUDA driver is asked whether it was initialised all the same; such a process
would train on the wrong devices, so the rank refuses to train in it (`check_cuda_untouched`).
CPU threads: OpenMP reads OMP_NUM_THREADS once, when torch loads, which here is before Ray sets
it for the actor; the rank sets torch's threads from it (`adopt_actor_threads`).
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import threading
import time
from typing import Any

from elastic_ft.resources import sigterm
from elastic_ft.resources.warm_pool import WARM_ENV

SETUP_HOOK = "elastic_ft.resources.worker_setup.setup"
RUNTIME_ENV: dict[str, Any] = {"worker_process_setup_hook": SETUP_HOOK}
CONTROLLER_WATCH_S = 5.0
IDLE_BEFORE_READY_S = 2.0

_state: dict[str, Any] = {"warm_s": None, "warm_started_t": None, "warmed_t": None,
                          "cuda_initialized": False}


def setup() -> None:
    sigterm.install()
    raw = os.environ.get(WARM_ENV)
    if raw:
        warm(json.loads(raw))


def warm(spec: dict[str, Any]) -> None:
    t0 = _state["warm_started_t"] = time.time()
    warm_imports(spec["accelerator"], spec["modules"])
    _state["cuda_initialized"] = cuda_driver_initialized()
    _state["warmed_t"] = time.time()
    _state["warm_s"] = _state["warmed_t"] - t0
    threading.Thread(target=_report_then_watch, args=(spec["controller"], spec["namespace"]),
                     daemon=True).start()


def warm_imports(accelerator: str, modules: list[str]) -> None:
    """DeepSpeed as a rank imports it, then `modules`, without probing for CUDA devices."""
    guard = {"DS_ACCELERATOR": accelerator, "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
    saved = {k: os.environ.get(k) for k in guard}
    os.environ.update(guard)
    try:
        from elastic_ft.core.lean_imports import import_deepspeed

        import_deepspeed()
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # the rank's own import of it reports the error
                pass
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def adopt_actor_threads() -> None:
    """torch's CPU threads as Ray set them for this actor (OMP_NUM_THREADS, from its CPUs), in
    a process that imported torch while warming, before Ray set them: OpenMP reads the
    variable once, when torch loads, and would otherwise use every core of the node (two ranks
    on two cores ran six times slower)."""
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if _state["warm_s"] is not None and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))


def warm_times() -> tuple[float | None, float | None]:
    """When this process started and finished warming itself (None: it did not)."""
    return _state["warm_started_t"], _state["warmed_t"]


def warm_s() -> float | None:
    """How long this process warmed itself (None: it did not)."""
    return _state["warm_s"]


def check_cuda_untouched() -> None:
    """In a rank, before it picks its GPU: refuse a process the warm-up initialised CUDA in."""
    if _state["cuda_initialized"]:
        raise RuntimeError(
            "elastic_ft: CUDA was initialised while this worker process warmed up, before Ray "
            "chose its GPUs, so it would train on the wrong devices; set "
            "workers.warm_spares: false")


def cuda_driver_initialized() -> bool:
    """Whether this process's CUDA driver is initialised (cuDeviceGetCount answers
    CUDA_ERROR_NOT_INITIALIZED, 3, before cuInit); False where there is no driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return int(libcuda.cuDeviceGetCount(ctypes.byref(count))) != 3


def _claimed() -> bool:
    import ray

    return ray.get_runtime_context().get_actor_id() is not None


def _report_then_watch(controller_name: str, namespace: str) -> None:
    """A spare stays idle after warming; a process Ray started for an actor gets the actor's
    creation at once (it waited for this hook), so only one still idle after a moment lists
    itself as a spare. No actor calls here: Ray cannot submit a task from a process that has
    run none yet."""
    import ray
    from ray.experimental.internal_kv import _internal_kv_put

    from elastic_ft.resources.warm_pool import spare_key, spare_prefix

    for _ in range(int(IDLE_BEFORE_READY_S / 0.25)):
        time.sleep(0.25)
        if _claimed():
            return
    key = spare_key(spare_prefix(controller_name), ray.get_runtime_context().get_node_id(),
                    os.getpid())
    _internal_kv_put(key, json.dumps({"warm_s": round(_state["warm_s"], 3)}))
    while not _claimed():
        time.sleep(CONTROLLER_WATCH_S)
        try:  # a lookup in the GCS, not a call
            ray.get_actor(controller_name, namespace=namespace)
        except ValueError:
            if not _claimed():
                os._exit(0)  # an idle spare of a finished run: nothing will use it
