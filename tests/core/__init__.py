"""The C core through its bindings (``clusterhub._bindings``): framing, the
decoder, the lock table, and ``LockBase`` (the C type of lock handles); what
each header in csrc/ promises, tested from Python.

A package (tests/ itself is not one), so that its modules are ``core.test_*``
and import the shared helpers with ``from conftest import ...``.
"""
