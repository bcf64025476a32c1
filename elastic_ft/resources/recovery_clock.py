"""Ray Train's side of a restart's timeline (resources/recovery.py): a callback in its
controller that marks each decision and each worker-group phase on our controller."""

from __future__ import annotations

import time
from typing import Any

from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback


class RecoveryClock(ControllerCallback, WorkerGroupCallback):
    """Runs inside Ray Train's controller: timestamps its decisions and its worker groups."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller

    def _mark(self, name: str) -> None:
        try:  # fire and forget: never slow down or fail Ray Train's loop
            self.controller.clock.remote(name, time.time())
        except Exception:
            pass

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        before = previous_state._state_type.state_name
        after = current_state._state_type.state_name
        if before == "RUNNING" and after != "RUNNING":
            self._mark(f"ray_train:{after.lower()}")

    def before_worker_group_shutdown(self, worker_group: Any) -> None:
        self._mark("old_group_stopping")

    def after_worker_group_shutdown(self, worker_group_context: Any) -> None:
        self._mark("old_group_stopped")

    def before_worker_group_start(self, worker_group_context: Any) -> None:
        self._mark("new_group_scheduling")

    def after_worker_group_start(self, worker_group: Any) -> None:
        self._mark("new_workers_started")

    def after_worker_group_training_start(self, worker_group: Any) -> None:
        self._mark("train_fn_launched")
