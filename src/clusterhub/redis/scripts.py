"""The Lua scripts of the Redis engine: each lock operation is one script
call, atomic on the server.

Keys of one hub share the hash tag ``{ch:<name>}`` (one slot); ``P`` below is
that prefix.

- ``P:proc:<id>``: a process's lease, a string ``"<pid> <host> <worker id or
  ->"`` with a TTL of the lease, renewed by its owner.
- ``P:lock:<key>``: a held lock, a hash: ``owner`` (the holder's process
  id), ``acq`` (this acquisition's id, unique), ``token`` (its fencing
  token), ``w`` (set when someone waited during this holding).  No TTL: the
  holder's lease is its liveness, so a long holding costs nothing to renew.
- ``P:wake:<key>``: a list with at most one element, the wake-up a release
  leaves for a blocked waiter (``BLPOP``), with a TTL so that one nobody
  took goes away.
- ``P:fence``: the hub-wide counter fencing tokens come from; when the server
  lost it (a restart without persistence) it is re-seeded from the server's
  clock in microseconds, above any token it gave before (fewer than a
  million acquisitions a second).
"""

from __future__ import annotations

# KEYS: lock, fence.  ARGV: our process id, this acquisition's id, the lease
# key prefix (P:proc:), whether this acquirer was woken (then others may wait
# too: mark the holding so that its release wakes the next).
# -> {1, token, recovered} when taken (also when a retry finds it ours),
#    {0, ms left of the holder's lease} when held by a live process,
#    {-1} when our own lease is gone (we were paused past it, or the server
#    lost it): nothing is taken under a lease nobody renews; the caller renews
#    (marking what it held lost) and tries again.
ACQUIRE = """
if redis.call('EXISTS', ARGV[3] .. ARGV[1]) == 0 then return {-1} end
local cur = redis.call('HMGET', KEYS[1], 'owner', 'acq', 'token')
local recovered = 0
if cur[1] then
  if cur[2] == ARGV[2] then return {1, tonumber(cur[3]), 0} end
  local left = redis.call('PTTL', ARGV[3] .. cur[1])
  if left > 0 then
    redis.call('HSET', KEYS[1], 'w', '1')
    return {0, left}
  end
  recovered = 1
  redis.call('DEL', KEYS[1])
end
local token = redis.call('INCR', KEYS[2])
if token == 1 then
  local t = redis.call('TIME')
  token = tonumber(t[1]) * 1000000 + tonumber(t[2])
  redis.call('SET', KEYS[2], token)
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'acq', ARGV[2], 'token', token)
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'w', '1') end
return {1, token, recovered}
"""

# KEYS: lock, wake.  ARGV: the acquisition's id, the wake-up's TTL (ms).
# -> 1 released; 0 not ours (lost: taken over after our lease ran out, or the
# server lost it).
RELEASE = """
local h = redis.call('HMGET', KEYS[1], 'acq', 'w')
if h[1] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if h[2] then
  if redis.call('LLEN', KEYS[2]) == 0 then redis.call('RPUSH', KEYS[2], '1') end
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# A waiter that took a wake-up and then gave up passes it on: at once if the
# lock is free (and no wake-up waits already), else to the release of
# whoever took it meanwhile (marked as waited for: its holding may have begun
# without a waiter's mark, and the waiters still blocked are not retrying).
# KEYS: lock, wake.  ARGV: TTL (ms).
PASS_ON = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'w', '1')
elseif redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1
"""

# Renew a lease.  KEYS: our lease, the master key (or our lease again).
# ARGV: lease (ms), our id, whether we are the master.
# -> 1 renewed; 0 the lease was gone (expired, or the server lost it);
#    2 renewed, but the name is not ours (any more): the locks are still ours.
RENEW = """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then return 0 end
if ARGV[3] == '1' then
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 2 end
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return 1
"""
