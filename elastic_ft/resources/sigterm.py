"""SIGTERM to a training worker -> a preemption notice, i.e. a just-in-time checkpoint.

A spot node's shutdown (or a pod's termination) reaches the worker processes as SIGTERM, and
Ray's worker main loop answers it by exiting at once, losing every step since the last
periodic checkpoint. `install` runs in Ray's `worker_process_setup_hook` (worker_setup.py),
in the worker's main thread just before that loop sets its handler, and wraps the setter:
while the process is training (`arm`), the first SIGTERM is only recorded; the training loop
reads it at the next step boundary (`take_notice`) and tells the controller, which asks for a
just-in-time checkpoint. A second SIGTERM, or one to a process that is not training, exits the
way Ray's own handler does.
"""

from __future__ import annotations

import time
from typing import Any

_state: dict[str, Any] = {"armed": False, "received_at": None, "taken": False}


def install() -> None:
    import ray._private.utils as ray_utils

    set_ray_handler = ray_utils.set_sigterm_handler

    def set_handler(ray_handler: Any) -> None:
        def handler(signum: int, frame: Any) -> None:
            if _state["armed"] and _state["received_at"] is None:
                _state["received_at"] = time.time()
                return
            ray_handler(signum, frame)

        set_ray_handler(handler)

    ray_utils.set_sigterm_handler = set_handler


def arm() -> None:
    _state.update(armed=True, received_at=None, taken=False)


def disarm() -> None:
    _state["armed"] = False


def take_notice() -> float | None:
    """When the first SIGTERM arrived, once; None before one arrives and after it was taken."""
    if _state["received_at"] is None or _state["taken"]:
        return None
    _state["taken"] = True
    return _state["received_at"]
