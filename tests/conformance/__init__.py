"""The transport conformance suite: the public-API behaviours every transport
must keep, each test run once per transport through the ``cluster`` fixture
(see cluster.py for what a test may rely on, and conftest.py for the list of
transports).

A package (tests/ itself is not one), so that its modules are
``conformance.*`` and import the shared helpers with ``from conftest import
...``.
"""
