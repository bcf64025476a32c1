"""A re-plan restart is not a failure: Ray Train's failure policy, minus our own restarts.

A memory re-plan (the trend near a rank's budget, or an OOM) and a rebalance need the worker
group to restart with a new plan: the workers raise `ReplanRestart` (after a just-in-time
checkpoint, except after an OOM). Ray Train V2 counts every worker-group error against
`FailureConfig.max_failures`, so a run with `workers.max_failures: 0` would die on its first
re-plan. `ReplanAwareFailurePolicy` retries those errors without counting them and hands every
other error to Ray Train's own `DefaultFailurePolicy` unchanged. Each re-plan lowers a cap
(bounded by halving) or needs a predicted gain (planning.rebalance_decision), so they end.

Ray Train takes its failure policy from the trainer; `ElasticTorchTrainer` passes this one.
It also leaves out Ray Train's datasets callback, as the run passes no `datasets=`
(`without_datasets_callback`).
"""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision
from ray.train.v2.api.exceptions import WorkerGroupError

MARKER = "elastic_ft.replan_restart"


class ReplanRestart(RuntimeError):
    """Raised by every rank (or the OOM rank) to restart the group with a new plan."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(f"{MARKER}: {kind}: {reason}")
        self.kind, self.reason = kind, reason

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:  # Ray sends it to the driver
        return (type(self), (self.kind, self.reason))


def is_replan(error: BaseException) -> bool:
    """A worker-group error in which a rank asked for the restart. As with Ray's preemption
    rule, the request wins over the other ranks' collateral errors (a collective cut short)."""
    return isinstance(error, WorkerGroupError) and any(
        MARKER in str(failure) for failure in error.worker_failures.values())


class ReplanAwareFailurePolicy(DefaultFailurePolicy):
    def make_decision(self, training_failed_error: Any) -> FailureDecision:
        if is_replan(training_failed_error):
            return FailureDecision.RETRY
        return super().make_decision(training_failed_error)


def without_datasets_callback(callbacks: list[Any], datasets: dict[str, Any] | None) -> list[Any]:
    """Ray Train's default callbacks, less its datasets callback when there are no datasets.

    That callback starts a `DatasetManager` actor for every worker group even without datasets:
    a new process importing Ray Data, 1-2 s of CPU beside each restart's model load (seen in a
    per-process CPU sample of a resize). The ranks read their blocks themselves
    (data/shards.py).
    """
    from ray.train.v2._internal.callbacks import DatasetsCallback

    if datasets:
        return callbacks
    return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


class ElasticTorchTrainer(TorchTrainer):
    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        controller_init_kwargs["failure_policy"] = ReplanAwareFailurePolicy(
            self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)

    def _create_default_callbacks(self) -> list[Any]:
        return without_datasets_callback(super()._create_default_callbacks(), self.datasets)
