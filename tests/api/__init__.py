"""The public API, as a user calls it: processes, messages, requests, locks
(threads, asyncio, the threading.Lock drop-in), asyncio, errors and bad input,
the examples and the command line, with forked workers.

A package (tests/ itself is not one), so that its modules are ``api.test_*``
and import the shared helpers with ``from conftest import ...``.
"""
