"""The ``cluster`` fixture: one master hub and its workers, once per transport
in ``cluster.TRANSPORTS``."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

import clusterhub

from .cluster import TRANSPORTS, Cluster


@pytest.fixture(params=sorted(TRANSPORTS))
def cluster(request: pytest.FixtureRequest, make_hub: Callable[..., clusterhub.Hub]) -> Iterator[Cluster]:
    """The master hub of one transport (``cluster.hub``) and a way to start
    workers on it; the hub is closed, and checked, after the test."""
    cls = TRANSPORTS[request.param]
    c = cls(cls.master_hub(make_hub))
    yield c
    c.teardown()
