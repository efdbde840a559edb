"""Joining a master by address: connect time (median and p99) over 1,000
connect-and-leave cycles in the full run, with the master's fds and memory
after each batch (the kit's case, from ``clusterhub.bench.connecting``)."""

from __future__ import annotations

from typing import Any

import pytest

from clusterhub.bench.connecting import CONNECT


@pytest.mark.benchmark(group="connect")
@pytest.mark.parametrize("case", CONNECT.cases)
def test_connect(measure: Any, case: str) -> None:
    """clusterhub.connect() then close(), timed in the connecting process; the master's fds and RSS after each batch."""
    measure(CONNECT, case)
