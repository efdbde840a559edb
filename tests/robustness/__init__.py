"""Whole-system properties under stress: chaos (random SIGKILLs, crash points
in the lock table), soak (bounded resources over a long run), isolation (what
the hub's descriptors and memory let other programs reach).

A package (tests/ itself is not one), so that its modules are
``robustness.test_*`` and import the shared helpers with ``from conftest
import ...``.
"""
