"""Benchmarks (a package so that its conftest is ``benchmarks.conftest``, not
the ``conftest`` that tests/ imports helpers from)."""
