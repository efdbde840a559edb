"""The third-party peers of the benchmarks (pyzmq, filelock, fasteners,
posix_ipc, sysv_ipc) are optional: they come with the ``bench`` extra
(``pip install ".[test,bench]"``).  A peer whose module does not import is left
out of its jobs (so a full run still measures the rest of the group), and each
test of its cases skips with the reason; everything else runs.  A peer that
is not a module (node's cluster-hub) is declared with ``require``; one that
finds out only when set up (an ``npm install`` that fails) raises
``clusterhub.bench.host.Unavailable``, and the same happens then."""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional

import pytest

from clusterhub.bench.host import Case
from clusterhub.bench.jobs import Job, Target

HINT = "the benchmark peers come with the 'bench' extra: pip install 'clusterhub[bench]'"

_missing: dict[str, str] = {}  # module -> why it cannot be used
_cases: dict[str, dict[str, Optional[str]]] = {}  # job name -> case -> None, or why it is left out


def optional(module: str, dist: Optional[str] = None) -> Any:
    """``module``, or None when it does not import (the reason is kept for ``with_peers``)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        _missing[module] = f"{dist or module} is not installed ({e}); {HINT}"
        return None


def require(name: str, reason: Optional[str]) -> None:
    """Declare a requirement that is not a module (e.g. "node"): ``reason``
    says why it is missing, None when it is there."""
    if reason is not None:
        _missing[name] = reason


def with_peers(job: Job, peers: Mapping[str, tuple[str, Case]], targets: tuple[Target, ...] = ()) -> Job:
    """``job`` extended with the peer cases (``case: (module or requirement,
    case factory)``) whose module imported (or requirement is met);
    ``case_params(job)`` lists the others too, skipped."""
    present = {case: make for case, (module, make) in peers.items() if module not in _missing}
    extended = job.extended(present, targets)  # a target about a missing peer is not reported
    _cases[extended.name] = {
        **dict.fromkeys(job.cases),
        **{case: _missing.get(module) for case, (module, _) in peers.items()},
    }
    return extended


def case_params(job: Job) -> list[Any]:
    """The ``case`` parameters of a test over ``job`` (made by ``with_peers``):
    every case in order, those of a missing peer marked to skip with the reason."""
    return [
        case if reason is None else pytest.param(case, marks=pytest.mark.skip(reason=reason))
        for case, reason in _cases[job.name].items()
    ]
