"""The compute clock load balancing compares, and the documented fault injection."""

from __future__ import annotations

import threading
import time

import pytest

from elastic_ft.core.step import ComputeClock, Faults


def _burn(cpu_s: float) -> None:
    end = time.thread_time() + cpu_s
    while time.thread_time() < end:
        pass


def test_cpu_clock_counts_this_threads_compute_and_the_drills_stretch() -> None:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray worker with one CPU: torch computes on the calling thread
    clock = ComputeClock(torch.device("cpu"))
    torch.set_num_threads(threads)  # the clock chose its source; later tests keep theirs
    stop = threading.Event()
    other = threading.Thread(target=lambda: [_burn(0.01) for _ in iter(stop.is_set, True)])
    other.start()  # another thread of the process (Ray's prefetch, say) is not counted
    try:
        started = clock.start()
        _burn(0.05)
        clock.stop(started, Faults())
        plain = clock.seconds()
        torch.set_num_threads(1)
        slowed = ComputeClock(torch.device("cpu"))
        torch.set_num_threads(threads)
        t0 = time.time()
        started = slowed.start()
        _burn(0.05)
        slowed.stop(started, Faults(slowdown=3.0))
        wall = time.time() - t0
    finally:
        stop.set()
        other.join()
    assert plain == pytest.approx(0.05, rel=0.3)
    assert slowed.seconds() == pytest.approx(3 * 0.05, rel=0.3)  # compute + 2x its sleep
    assert wall >= 0.14  # the sleep really happened


def test_the_backwards_stretch_is_slept_before_it_from_the_last_backward() -> None:
    """A slower device's backward ends, and its gradient reduction starts, later: the drill
    sleeps before the backward, (F-1) x the expected compute, so that the other ranks wait for
    it in that one reduction and not again in the optimizer step's collective."""
    import torch

    faults = Faults(slowdown=3.0)
    t0 = time.monotonic()
    faults.stretch_backward_ahead(4, forward_s=0.04)  # no backward yet: the forward's compute
    assert 0.08 <= time.monotonic() - t0 < 0.3
    clock = ComputeClock(torch.device("cpu"))
    started = clock.start()
    _burn(0.04)
    t0 = time.monotonic()
    compute_s = clock.stop(started, faults, stretch=False)  # measured, not slept after
    assert time.monotonic() - t0 < 0.02 and compute_s == pytest.approx(0.04, rel=0.3)
    faults.learn_backward(compute_s, 4)
    t0 = time.monotonic()
    faults.stretch_backward_ahead(2, forward_s=1.0)  # 2 samples at the last backward's rate
    assert 0.035 <= time.monotonic() - t0 < 0.2
    t0 = time.monotonic()
    Faults().stretch_backward_ahead(4, forward_s=1.0)  # no drill: no sleep
    assert time.monotonic() - t0 < 0.02
    assert faults == Faults(slowdown=3.0)  # what it learned is not part of the setting


def test_the_drill_stretches_wall_time_and_the_clock_counts_compute() -> None:
    """On a shared CPU a rank's compute takes longer in wall time than in CPU time: a device F
    times slower would take F x that wall time, while the clock, which the balancer compares,
    counts F x the CPU time. The backward's sleep ahead follows the forward's proportion."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    clock = ComputeClock(torch.device("cpu"))
    torch.set_num_threads(threads)
    faults = Faults(slowdown=2.0)
    started = clock.start()
    _burn(0.04)
    time.sleep(0.04)  # the core taken by another process: wall time without compute
    t0 = time.monotonic()
    compute_s = clock.stop(started, faults)
    slept_s = time.monotonic() - t0
    assert compute_s == pytest.approx(0.04, rel=0.3)
    assert slept_s == pytest.approx(0.08, rel=0.3)  # (F-1) x the 0.08 s of wall time
    assert clock.seconds() == pytest.approx(0.08, rel=0.3)  # F x the compute
    assert faults.wall_per_compute == pytest.approx(2.0, rel=0.3)
    faults.learn_backward(0.02, 2)
    t0 = time.monotonic()
    faults.stretch_backward_ahead(2, forward_s=None)  # 0.02 s of compute at 2x wall
    assert time.monotonic() - t0 == pytest.approx(0.04, rel=0.4)


def test_faults_from_the_environment() -> None:
    assert Faults.from_env({}) == Faults()
    faults = Faults.from_env({"ELASTIC_FT_FAULT_SLOWDOWN": "2",
                              "ELASTIC_FT_FAULT_OOM_MICRO_BATCH_OVER": "1",
                              "ELASTIC_FT_FAULT_OOM_PHASE": "backward"})
    assert faults == Faults(2.0, 1, "backward")
    import torch

    faults.maybe_oom("forward", 4)  # another phase: nothing
    faults.maybe_oom("backward", 1)  # not over: nothing
    with pytest.raises(torch.OutOfMemoryError, match="fault injection"):
        faults.maybe_oom("backward", 2)
    with pytest.raises(ValueError, match="ELASTIC_FT_FAULT_OOM_PHASE"):
        Faults.from_env({"ELASTIC_FT_FAULT_OOM_PHASE": "step"})
