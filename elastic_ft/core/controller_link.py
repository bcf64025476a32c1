"""What rank 0 exchanges with the controller while the steps run, at a cost that does not grow
with the step rate: one poll outstanding for the controller's requests, which answers when a
request is made (or after `POLL_WAIT_S` with none), and the steps' records sent together at most
every `SEND_INTERVAL_S`, at once when the controller must know the newest step.

A call of each per step (as before) took CPU from the cores the ranks train on, in the ranks
and in the controller actor: with them, the tiny model's ~60 ms steps on 2 cores were 2.4 to
14.5 ms slower (median 6.2 ms) in 4 interleaved rounds of 500 steps. A step longer than the
interval sends its record at once, as before; so does every step when the interval is 0.
"""

from __future__ import annotations

import time
from typing import Any

POLL_WAIT_S = 5.0  # how long a poll waits in the controller for a request before answering
SEND_INTERVAL_S = 0.5


class RequestPoll:
    """The controller's requests (checkpoint now; a restart follows or not), seen the step after
    they are made, as fast as a poll per step saw them, without a call per step."""

    def __init__(self, controller: Any, wait_s: float = POLL_WAIT_S) -> None:
        self._controller, self._wait_s = controller, wait_s
        self._ref: Any = controller.poll.remote(wait_s)

    def take(self) -> dict[str, Any] | None:
        """The request made since the last call, if any; never waits."""
        import ray

        if self._ref is None:
            return None
        ready, _ = ray.wait([self._ref], timeout=0)
        if not ready:
            return None
        request = ray.get(self._ref)
        # after a request, the next poll waits for `rearm`: sent now, it would be answered at
        # once with the same request, still pending until its checkpoint is in storage
        self._ref = None if request is not None else self._controller.poll.remote(self._wait_s)
        return request

    def rearm(self) -> None:
        """After a request is handled (its checkpoint taken): poll for the next one."""
        if self._ref is None:
            self._ref = self._controller.poll.remote(self._wait_s)


class MetricsOutbox:
    """Rank 0's step records for the controller (`ElasticController.metrics`), in step order."""

    def __init__(self, controller: Any, interval_s: float = SEND_INTERVAL_S) -> None:
        self._controller, self.interval_s = controller, interval_s
        self._records: list[dict[str, Any]] = []
        self._sent_t = float("-inf")  # a group's first step goes at once

    def add(self, record: dict[str, Any], now: float, send_now: bool = False) -> None:
        """`send_now`: the controller must know this step at once (a checkpoint's step, the
        first after one, a request's, the last): Ray Train's resize asks for a just-in-time
        checkpoint only when the controller knows of a step trained since the newest one."""
        self._records.append(record)
        if send_now or now - self._sent_t >= self.interval_s:
            self.flush(now)

    def flush(self, now: float | None = None) -> None:
        """Send what is held (also when a step fails: its group's rows still count)."""
        if self._records:
            self._controller.metrics.remote(*self._records)
            self._records = []
            self._sent_t = time.time() if now is None else now
