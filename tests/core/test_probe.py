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

