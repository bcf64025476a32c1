from __future__ import annotations

import pytest

from elastic_ft.core.probe import largest_passing


@pytest.mark.parametrize("fit", [0, 1, 2, 3, 5, 8, 13, 64, 100])
@pytest.mark.parametrize("start", [1, 4, 7])
def test_largest_passing_finds_the_boundary(fit: int, start: int) -> None:
    calls: list[int] = []

    def passes(m: int) -> bool:
        calls.append(m)
        return m <= fit

    assert largest_passing(passes, limit=64, start=start) == min(fit, 64)
    assert max(calls) <= 64 and len(calls) <= 16  # doubling + bisection, not a scan


def test_cpu_allocated_peak_is_the_largest_live_tensor_total() -> None:
    import torch

    from elastic_ft.core.probe import CpuAllocatedPeak

    before = torch.ones(4_000_000)  # allocated outside the window: not counted
    with CpuAllocatedPeak() as tracker:
        a = torch.ones(10_000_000)  # 40 MB
        b = torch.ones(2_500_000)  # 10 MB: peak 50 MB
        del a, before  # a free of a tensor from before the window must not lower the total
        c = torch.ones(5_000_000)  # 20 MB: live 30 MB, below the peak
    assert 50_000_000 <= tracker.peak < 50_100_000
    del b, c
