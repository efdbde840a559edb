"""pytest plugin for CI (``-p installed_package`` with .ci/ on PYTHONPATH).

The suite runs from the checkout against the clusterhub installed from the
wheel.  Once the tests are collected (they import clusterhub at module level),
this prints which clusterhub and which compiled core they got, and ends the
run with an error unless both come from this interpreter's site-packages:
never the checkout's src/, whatever pytest put on sys.path.
"""

from __future__ import annotations

import importlib
import sys
import sysconfig
from pathlib import Path

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    checkout = session.config.rootpath.resolve()
    bad = []
    for name in ("clusterhub", "clusterhub._core"):
        module = sys.modules.get(name) or importlib.import_module(name)
        path = Path(module.__file__ or "?").resolve()
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"{name} under test: {path}")
        if checkout in path.parents or not any(s in path.parents for s in site):
            bad.append(f"{name} from {path}")
    if bad:
        pytest.exit(
            f"not the installed package: {', '.join(bad)} (site-packages: {', '.join(map(str, sorted(site)))})",
            returncode=4,
        )
