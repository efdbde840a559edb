"""The Lua scripts of the Redis engine: each lock operation is one script
call, atomic on the server.

Keys of one hub share the hash tag ``{ch:<name>}`` (one slot); ``P`` below is
that prefix.

- ``P:proc:<id>``: a process's lease, a string ``"<pid> <host> <worker id or
  ->"`` with a TTL of the lease, renewed by its owner.
- ``P:lock:<key>``: a held lock, a hash: ``owner`` (the holder's process
  id), ``acq`` (this acquisition's id, unique: ``<process id>:<pid>:<n>``),
  ``token`` (its fencing token).  No TTL: the holder's lease is its
  liveness, so a long holding costs nothing to renew.
- ``P:queue:<key>``: the acquisition ids waiting for the key, first come
  first.  A release hands the key to the first whose process is alive: it
  becomes the holder in the same script, so a woken waiter never finds the
  key taken again (no wake-up wasted on a lost race, no starving waiter).
- ``P:wake:<acq>``: the list a waiter blocks on (``BLPOP``); a hand-off
  pushes the new fencing token there, with a TTL so that one nobody took
  goes away.
- ``P:gone:<acq>``: an acquisition that gave up by an exception (a command
  of it may still be on its way), for 20 minutes: ACQUIRE refuses it.
- ``P:fence``: the hub-wide counter fencing tokens come from; when the server
  lost it (a restart without persistence) it is re-seeded from the server's
  clock in microseconds, above any token it gave before (fewer than a
  million acquisitions a second).
"""

from __future__ import annotations

# The next fencing token (KEYS[2] is the counter in every script using it).
_TOKEN = """
local function next_token()
  local token = redis.call('INCR', KEYS[2])
  if token == 1 then
    local t = redis.call('TIME')
    token = tonumber(t[1]) * 1000000 + tonumber(t[2])
    redis.call('SET', KEYS[2], token)
  end
  return token
end
"""

# Hand the key to the first live waiter, or free it.  KEYS: lock, fence,
# queue.  ARGV[2]: the lease key prefix (P:proc:), ARGV[3]: the wake-up key
# prefix (P:wake:), ARGV[4]: the wake-up's TTL (ms).
_HAND_ON = """
local function hand_on()
  while true do
    local acq = redis.call('LPOP', KEYS[3])
    if not acq then
      redis.call('DEL', KEYS[1])
      return
    end
    local owner = string.match(acq, '^(%d+):')
    if owner and redis.call('EXISTS', ARGV[2] .. owner) == 1 then
      local token = next_token()
      redis.call('HSET', KEYS[1], 'owner', owner, 'acq', acq, 'token', token)
      redis.call('RPUSH', ARGV[3] .. acq, token)
      redis.call('PEXPIRE', ARGV[3] .. acq, ARGV[4])
      return
    end
  end
end
"""

# KEYS: lock, fence, queue.  ARGV: our process id, this acquisition's id,
# the lease key prefix (P:proc:), whether to queue when the key is held (not
# for a try without waiting), our wake-up key (P:wake:<acq>), the slice (ms)
# of a BLPOP sent right behind this call or 0 for none, and the key that
# marks this acquisition given up (P:gone:<acq>: see GIVE_UP).
# -> {1, token, recovered} when taken (also when it was handed to us),
#    {0, ms left of the holder's lease} when held by a live process (queued
#    then: a release hands the key to us, pushing the token to P:wake:<acq>),
#    {-1} when our own lease is gone (we were paused past it, or the server
#    lost it): nothing is taken under a lease nobody renews; the caller renews
#    (marking what it held lost) and tries again,
#    {0, 0} for an acquisition given up (nobody reads it).
# A BLPOP sent right behind blocks only when the holder's lease outlasts its
# slice; otherwise the script leaves it an 'x' to return at once.
ACQUIRE = _TOKEN + """
local wake, slice = ARGV[5], tonumber(ARGV[6])
local function reply(r, blocks)
  if slice > 0 and not blocks and redis.call('LLEN', wake) == 0 then
    redis.call('RPUSH', wake, 'x')
    redis.call('PEXPIRE', wake, slice)
  end
  return r
end
if redis.call('EXISTS', ARGV[7]) == 1 then return {0, 0} end
if redis.call('EXISTS', ARGV[3] .. ARGV[1]) == 0 then return reply({-1}) end
local cur = redis.call('HMGET', KEYS[1], 'owner', 'acq', 'token')
local recovered = 0
if cur[1] then
  if cur[2] == ARGV[2] then
    if slice == 0 then redis.call('DEL', wake) end
    return reply({1, tonumber(cur[3]), 0})
  end
  local left = redis.call('PTTL', ARGV[3] .. cur[1])
  if left > 0 then
    if ARGV[4] == '1' and not redis.call('LPOS', KEYS[3], ARGV[2]) then redis.call('RPUSH', KEYS[3], ARGV[2]) end
    return reply({0, left}, left >= slice)
  end
  recovered = 1
end
redis.call('LREM', KEYS[3], 1, ARGV[2])
local token = next_token()
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'acq', ARGV[2], 'token', token)
return reply({1, token, recovered})
"""

# KEYS: lock, fence, queue.  ARGV: the acquisition's id, then as _HAND_ON.
# -> 1 released (handed on); 0 not ours (lost: taken over after our lease
# ran out, or the server lost it).
RELEASE = _TOKEN + _HAND_ON + """
if redis.call('HGET', KEYS[1], 'acq') ~= ARGV[1] then return 0 end
hand_on()
return 1
"""

# A waiter that gives up (timeout, cancel, Ctrl-C, an error): out of the
# queue; if the key was handed to it meanwhile (or taken, the reply lost), on
# to the next; a token left for it goes.  Arguments as RELEASE's, then the
# time (ms) the acquisition stays refused (0: not at all; an ACQUIRE of it may
# still be on its way when it ended by an exception) and its mark (P:gone:<acq>).
# -> 1
GIVE_UP = _TOKEN + _HAND_ON + """
if ARGV[5] ~= '0' then redis.call('SET', ARGV[6], '1', 'PX', ARGV[5]) end
redis.call('LREM', KEYS[3], 1, ARGV[1])
redis.call('DEL', ARGV[3] .. ARGV[1])
if redis.call('HGET', KEYS[1], 'acq') == ARGV[1] then hand_on() end
return 1
"""

# Renew a lease, and the TTL of our inbox with it; the hub's own keys
# (P:ids, P:lease, P:fence) live on while any of its processes does (see
# VACATE).  KEYS: our lease, the master key (or our lease again), our inbox,
# its byte count, its blocked senders, then the hub's own keys.  ARGV: lease
# (ms), our id, whether we are the master, the lease key prefix (P:proc:).
# -> {status, the id of the master if its lease is live, else 0}; status 1
#    renewed; 0 the lease was gone (expired, or the server lost it); 2
#    renewed, but the name is not ours (any more): the locks are still ours.
RENEW = """
local function master()
  local m = redis.call('GET', KEYS[2])
  if m and redis.call('PTTL', ARGV[4] .. m) > 0 then return tonumber(m) end
  return 0
end
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 0 then return {0, master()} end
for i = 3, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
for i = 6, #KEYS do redis.call('PERSIST', KEYS[i]) end
if ARGV[3] == '1' then
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then return {2, master()} end
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return {1, master()}
"""

# The last process of a hub leaves: when no process listed in P:procs
# (ours is gone already) holds a lease, the hub's own keys (KEYS: P:procs,
# then P:ids, P:lease, P:fence) are left to expire in ARGV[2] ms; until
# then a process that joins continues its ids and tokens (its renewals make
# them last again, see RENEW).  (Not deleted at once: a process may be
# joining, its id taken but its lease not set yet.)  ARGV[1]: P:proc:.
# -> 1 when the hub was left empty, else 0.
VACATE = """
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[1] .. id) == 1 then return 0 end
end
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
return 1
"""

# ---- messages -----------------------------------------------------------------------
#
# - ``P:inbox:<id>``: a process's inbox, a list of entries (an envelope as
#   protocol.py describes it, behind an HMAC when the hub has an authkey),
#   with the TTL of the process's lease: a dead process's inbox goes with
#   its lease.  Senders push at the head, its reader takes entries off the
#   tail as it reads them (BRPOP: INFO commandstats tells inbox reads from
#   lock waits, which are BLPOPs).
# - ``P:push:<id>``: a channel its reader subscribes to on the connection
#   that pops its inbox (RESP3, Redis 7): while the inbox is empty, an entry
#   is published there instead of pushed, so the reader gets it without a
#   pop to issue again.  Order holds: the reader's pops and its channel's
#   messages come over that one connection in the order the server made
#   them, and an entry is published only when nothing older waits in the
#   list (and it is small: see _DELIVER).
# - ``P:queued:<id>``: the bytes sent to that inbox (listed or published)
#   that its reader has not counted out yet (same TTL).
# - ``P:blocked:<id>``: senders waiting for room in it, a sorted set of
#   their wake-up lists (``P:room:<process>:<thread>``) scored by their
#   bound (max_queue): the reader pushes to those whose bound the inbox is
#   back under.

# A reader counts what it took out of its inbox's byte count now and then
# (see messages.py); while a sender waits for room, an empty entry in the
# inbox (once: P:nudge:<id> marks it there) tells the reader to do it when
# it gets there, having taken everything before it.
_NUDGE = """
local function nudge(P, t, ttl)
  if redis.call('SET', P .. 'nudge:' .. t, '1', 'NX', 'PX', ttl) then
    redis.call('LPUSH', P .. 'inbox:' .. t, '')
    redis.call('PEXPIRE', P .. 'inbox:' .. t, ttl)
  end
end
"""

# Put one entry in a live inbox (published to its reader while the inbox is
# empty), unless more than ``mq`` bytes sent to it are not counted out yet
# (-1: no bound); then register ``room`` to be told when it has room again.
# (``queued``: that count, once an entry went.)
# Only entries up to 64 KiB are published, and only while at most 1 MiB
# sent is not counted out: what is published waits in the server's output
# buffer for the reader, where Redis cuts a pub/sub client off past its
# limits (by default 8 MB for 60 s, or 32 MB).
_DELIVER = _NUDGE + """
local PUBLISH_MAX, PUBLISHED_MAX = 65536, 1048576
local queued = 0
local function deliver(P, t, ttl, mq, room, entry)
  local qk = P .. 'queued:' .. t
  local q = redis.call('INCRBY', qk, #entry)
  if q == #entry then
    redis.call('PEXPIRE', qk, ttl)
  elseif mq >= 0 and q - #entry > mq then
    redis.call('DECRBY', qk, #entry)
    local bk = P .. 'blocked:' .. t
    redis.call('ZADD', bk, mq, room)
    redis.call('PEXPIRE', bk, ttl)
    nudge(P, t, ttl)
    return 0
  end
  local ib = P .. 'inbox:' .. t
  if #entry > PUBLISH_MAX or q > PUBLISHED_MAX or redis.call('LLEN', ib) > 0
      or redis.call('PUBLISH', P .. 'push:' .. t, entry) == 0 then
    -- (A key that existed has its TTL: set when it was made, renewed with the lease.)
    if redis.call('LPUSH', ib, entry) == 1 then redis.call('PEXPIRE', ib, ttl) end
  end
  queued = q
  return 1
end
"""

# Send one entry.  ARGV: P, the receiver's id ('M': the master), the bound
# (bytes; -1: none), our wake-up list for room, the entry, and with 'M'
# optionally the master's id we expect (a request: its reply must be
# matched to the master that gets it).
# -> {1, receiver, the bytes now counted in its inbox} delivered; {0,
#    receiver} its inbox is full (we are told of room on our list); {-1,
#    receiver or 0} it is not alive; {2, master} not sent: the master is
#    another than expected.
SEND = _DELIVER + """
local P, t = ARGV[1], ARGV[2]
if t == 'M' then
  t = redis.call('GET', P .. 'master')
  if not t then return {-1, 0} end
  if ARGV[6] and ARGV[6] ~= t then return {2, tonumber(t)} end
end
local ttl = redis.call('PTTL', P .. 'proc:' .. t)
if ttl <= 0 then return {-1, tonumber(t)} end
local ok = deliver(P, t, ttl, tonumber(ARGV[3]), ARGV[4], ARGV[5])
return {ok, tonumber(t), ok == 1 and queued or 0}
"""

# A broadcast, fanned out here: one entry to every live process but the
# master and the sender, or to those listed after the entry.  ARGV: P, the
# sender's id, then as SEND's from the bound on.
# -> {the most bytes now counted in one inbox it went to, the ids whose
#    inbox was full (each tells us of room)}.
BROADCAST = _DELIVER + """
local P = ARGV[1]
local top = 0
local targets
if #ARGV > 5 then
  targets = {}
  for i = 6, #ARGV do targets[#targets + 1] = ARGV[i] end
else
  targets = redis.call('HKEYS', P .. 'procs')
end
local master = redis.call('GET', P .. 'master')
local full = {}
for _, t in ipairs(targets) do
  if t ~= ARGV[2] and t ~= master then
    local ttl = redis.call('PTTL', P .. 'proc:' .. t)
    if ttl > 0 then
      if deliver(P, t, ttl, tonumber(ARGV[3]), ARGV[4], ARGV[5]) == 0 then
        full[#full + 1] = tonumber(t)
      elseif queued > top then
        top = queued
      end
    end
  end
end
return {top, full}
"""

# The reader's turn: take up to ARGV[4] entries off our inbox (0: none, on a
# server that has BLMPOP), count them (and ARGV[3] bytes the reader took by
# blocking pops or got published) out of its byte count, and wake the
# senders whose bound it is under now; to those still waiting, another
# nudge.  ARGV: P, our id, those bytes, the most to take, the TTL (ms) of a
# wake-up, and how the count restarts: '0' when the inbox is empty (a
# reader without a channel: nothing is on its way), '1' only when it falls
# to 0 (a reader with a channel), '2' from what the inbox holds (a reader
# that just connected: whatever the one before did not count out is lost).
# -> the entries.
TAKE = _NUDGE + """
local P, me = ARGV[1], ARGV[2]
local ib = P .. 'inbox:' .. me
local items = {}
if ARGV[4] ~= '0' then
  local got = redis.call('LRANGE', ib, -tonumber(ARGV[4]), -1)
  for i = #got, 1, -1 do items[#items + 1] = got[i] end
  if #items > 0 then redis.call('LTRIM', ib, 0, -#items - 1) end
end
local size = tonumber(ARGV[3])
for _, it in ipairs(items) do size = size + #it end
local qk = P .. 'queued:' .. me
local q
if ARGV[6] == '2' then
  q = 0
  for _, it in ipairs(redis.call('LRANGE', ib, 0, -1)) do q = q + #it end
  if q > 0 then redis.call('SET', qk, q, 'PX', ARGV[5]) end
else
  q = redis.call('DECRBY', qk, size)
end
if q <= 0 or (ARGV[6] == '0' and redis.call('LLEN', ib) == 0) then
  redis.call('DEL', qk)
  q = 0
end
local bk = P .. 'blocked:' .. me
local rooms = redis.call('ZRANGEBYSCORE', bk, q, '+inf')
for _, r in ipairs(rooms) do
  redis.call('RPUSH', r, 'r')
  redis.call('PEXPIRE', r, ARGV[5])
end
if #rooms > 0 then redis.call('ZREMRANGEBYSCORE', bk, q, '+inf') end
redis.call('DEL', P .. 'nudge:' .. me)
if redis.call('ZCARD', bk) > 0 then
  local ttl = redis.call('PTTL', P .. 'proc:' .. me)
  if ttl > 0 then nudge(P, me, ttl) end
end
return items
"""
