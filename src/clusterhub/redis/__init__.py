"""The Redis engine: the same API over a Redis server, chosen by the address
(``redis://host:port/db?name=N``, ``rediss://...``, ``redis+unix:///path?name=N``).

Global locks with leases, fencing tokens and no polling; the processes of
a hub (who is alive: a lease each); messages, requests and broadcasts
through an inbox per process on the server.

- ``url``: the address, parsed, with the password kept out of every text.
- ``scripts``: the Lua scripts (one call per acquire, release or send).
- ``link``: the server connection of one process, its lease and the thread
  that renews it; what becomes ``lost`` when the lease or the server's data
  is gone.
- ``locks``: the lock handles.
- ``messages``: a process's inbox, its reader thread, and sending.
- ``hub``: ``RedisHub``, the ``Hub`` a Redis address makes.

redis-py is imported only here, so a local hub does not need it.
"""
