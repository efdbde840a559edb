"""The ``cluster`` fixture: one master hub and its workers, once per transport
in ``cluster.TRANSPORTS`` that runs the test's module (``OverRedis.SUPPORTS``)."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

import clusterhub

from .cluster import TRANSPORTS, Cluster, OverRedis


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "cluster" in metafunc.fixturenames:
        module = metafunc.module.__name__.rpartition(".")[2]
        names = [n for n, cls in sorted(TRANSPORTS.items()) if cls is not OverRedis or module in OverRedis.SUPPORTS]
        metafunc.parametrize("cluster", names, indirect=True)


@pytest.fixture
def cluster(request: pytest.FixtureRequest, make_hub: Callable[..., clusterhub.Hub]) -> Iterator[Cluster]:
    """The master hub of one transport (``cluster.hub``) and a way to start
    workers on it; the hub is closed, and checked, after the test."""
    cls = TRANSPORTS[request.param]
    if cls is OverRedis:
        OverRedis.server_url = request.getfixturevalue("redis_session").url
    c = cls(cls.master_hub(make_hub))
    yield c
    c.teardown()
