from __future__ import annotations

import threading

import torch

from elastic_ft.core.peak_memory import CpuAllocatedPeak, peak_live_bytes


def test_cpu_allocated_peak_is_the_largest_live_tensor_total() -> None:
    before = torch.ones(4_000_000)  # allocated outside the window: not counted
    with CpuAllocatedPeak() as tracker:
        a = torch.ones(10_000_000)  # 40 MB
        b = torch.ones(2_500_000)  # 10 MB: peak 50 MB
        del a, before  # a free of a tensor from before the window must not lower the total
        c = torch.ones(5_000_000)  # 20 MB: live 30 MB, below the peak
    assert 50_000_000 <= tracker.peak < 50_100_000
    del b, c


def test_a_tensor_another_thread_frees_counts_only_until_its_step_ends() -> None:
    """As when gloo's worker thread drops the last reference to DeepSpeed's reduce buffer: the
    profiler sees no free, and its own running total (30 MB here) kept the buffer for good."""
    with CpuAllocatedPeak() as tracker:
        held = [torch.ones(2_500_000)]  # 10 MB, allocated on this thread
        dropper = threading.Thread(target=held.clear)
        dropper.start()
        dropper.join()
        tracker.end_step()
        kept = torch.ones(5_000_000)  # 20 MB in the next step
    assert 20_000_000 <= tracker.peak < 20_100_000
    del kept


def test_peak_live_bytes_replays_frees_seen_and_unseen() -> None:
    events = [(1, 0xA, 100), (2, 0xB, 50), (3, 0xA, -100),  # seen free: live 50
              (4, 0xC, 30),  # freed unseen, before the step ends at 10
              (11, 0xD, 200),  # live 250 at peak: B + D
              (12, 0xE, 40), (13, 0xE, 40),  # E handed out again: freed unseen in between
              (14, 0xF, -999)]  # a free of a block from before the window
    assert peak_live_bytes(events, held_at_end={0xB, 0xD, 0xE}, step_ends_ns=[10, 20]) == 290
    # Without the step's end nothing says when C went, so it stays: the profiler's figure.
    assert peak_live_bytes(events, held_at_end={0xB, 0xD, 0xE}, step_ends_ns=[]) == 320
    # Held at the end (optimizer states made in the first step): never dropped.
    assert peak_live_bytes(events, held_at_end={0xB, 0xC, 0xD, 0xE}, step_ends_ns=[10]) == 320


def test_peak_live_bytes_takes_events_in_any_order() -> None:
    """X freed unseen in step 1, handed out again in step 2 and freed unseen again: that block
    goes at step 2's end, not step 1's (the profiler's event tree is not in time order)."""
    events = [(1, 0xA1, 10), (11, 0xA1, 10), (15, 0xB, 100), (21, 0xC, 100)]
    for ordered in (events, list(reversed(events))):
        assert peak_live_bytes(ordered, held_at_end={0xB, 0xC}, step_ends_ns=[10, 20]) == 200
