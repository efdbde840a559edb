"""An idle hub: CPU used by an idle master with 4 idle workers, and the memory
a worker costs over a bare forked child (the kit's case, from
``clusterhub.bench.idle``)."""

from __future__ import annotations

from typing import Any

import pytest

from clusterhub.bench.idle import IDLE


@pytest.mark.benchmark(group="idle")
@pytest.mark.parametrize("case", IDLE.cases)
def test_idle(measure: Any, case: str) -> None:
    """CPU seconds per second, wake-ups and PSS of an idle master and 4 idle workers (bare forks as the floor)."""
    measure(IDLE, case)
