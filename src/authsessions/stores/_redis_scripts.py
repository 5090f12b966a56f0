"""The Lua scripts of ``RedisStore``, as text (see ``redis.py`` for the key layout).

Each script runs atomically on the node holding its keys. ``LUA_HELPERS`` is
prepended to the scripts that call its functions.
"""

from __future__ import annotations

__all__ = [
    "CREATE",
    "DELETE",
    "DELETE_EXPIRED",
    "DELETE_FOR_USER",
    "FOLLOW",
    "KEEPS_ROTATED_AWAY",
    "KEEPS_ROTATED_AWAY_ON",
    "LIST",
    "LUA_HELPERS",
    "READ",
    "RECORD_JSON",
    "ROTATED_AWAY",
    "UPDATE",
]

# Shared by every script. ARGV pairs are sent in slices: Lua's unpack has a stack limit.
LUA_HELPERS = """
local function hset_from(key, first)
  for i = first, #ARGV, 200 do
    redis.call('HSET', key, unpack(ARGV, i, math.min(i + 199, #ARGV)))
  end
end
local function hdel_range(key, first, last)
  for i = first, last, 200 do
    redis.call('HDEL', key, unpack(ARGV, i, math.min(i + 199, last)))
  end
end
local function extend(key, ms)
  if redis.call('PTTL', key) < tonumber(ms) then redis.call('PEXPIRE', key, ms) end
end
-- A session's pointer keys, its id's and its digest's, under the key prefix p.
local function pointer_keys(p, id, digest)
  return p .. 'i:' .. id, p .. 'd:' .. digest
end
-- On a single server (p the key prefix) a deleted session's pointers go with it, that of
-- the digest it was rotated away from (the hash's 'ra', false or '' for none) too; in a
-- cluster (p '{', which no key prefix holds) they live on other nodes, and the caller
-- removes them.
local function drop_pointers(p, id, digest, left)
  if p == '{' then return end
  if left and left ~= '' then
    redis.call('DEL', p .. 'r:' .. left, pointer_keys(p, id, digest))
  else
    redis.call('DEL', pointer_keys(p, id, digest))
  end
end
-- Deletes the doomed (id, digest, digest rotated away from) sessions and, on a single
-- server, their pointers; returns them as a flat list ('' for no digest rotated away).
local function forget(index, prefix, doomed, pointers)
  local out = {}
  for _, d in ipairs(doomed) do
    redis.call('DEL', prefix .. d[1])
    redis.call('ZREM', index, d[1])
    drop_pointers(pointers, d[1], d[2], d[3])
    out[#out + 1] = d[1]
    out[#out + 1] = d[2]
    out[#out + 1] = d[3] or ''
  end
  return out
end
"""

# KEYS: session, index. ARGV: now, ttl ms, max sessions, session key prefix, id,
# last_active_at, key prefix on a single server or '{' in a cluster, digest, tag, the TTL
# in ms of the pointer of the digest the session keeps as rotated away from (a login's
# over a live session: the pairs hold its 'ra' and 'ru') on a single server, else '' (none,
# or a cluster's, which the caller writes), field/value pairs. Returns nil if the id (or,
# on a single server, either pointer) exists, else the evicted (id, digest, digest rotated
# away from or '') triples (none when run again, as a retry).
CREATE = """
-- A client's retry of this very create after its reply was lost: it is done.
if redis.call('HGET', KEYS[1], 'td') == ARGV[8] then return {} end
local p = ARGV[7]
if p ~= '{' then
  -- Single server: the pointers (elsewhere in a cluster) are claimed in the same step.
  local id_key, digest_key = pointer_keys(p, ARGV[5], ARGV[8])
  if redis.call('EXISTS', KEYS[1], digest_key, id_key) > 0 then return false end
  redis.call('SET', digest_key, ARGV[9] .. ':' .. ARGV[5], 'PX', ARGV[2])
  redis.call('SET', id_key, ARGV[9], 'PX', ARGV[2])
elseif redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
hset_from(KEYS[1], 11)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if ARGV[10] ~= '' and p ~= '{' then
  -- Read back from the hash: the pairs just written hold the digest, where any may sit.
  local kept = redis.call('HGET', KEYS[1], 'ra')
  redis.call('SET', p .. 'r:' .. kept, ARGV[9] .. ':' .. ARGV[5], 'PX', ARGV[10])
end
-- The user's other sessions, read before the new one joins the index: it stays, and
-- at most max sessions - 1 of them, however recent their activity (a clock ahead).
local now, live, doomed = tonumber(ARGV[1]), {}, {}
for _, sid in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local f = redis.call('HMGET', ARGV[4] .. sid, 'ea', 'td', 'la', 'ca', 'ra')
  if not f[1] then
    redis.call('ZREM', KEYS[2], sid)
  elseif tonumber(f[1]) <= now then
    doomed[#doomed + 1] = {sid, f[2], f[5]}
  else
    live[#live + 1] = {sid, f[2], f[5], tonumber(f[3]), tonumber(f[4])}
  end
end
table.sort(live, function(a, b)
  if a[4] ~= b[4] then return a[4] > b[4] end
  return a[5] > b[5]
end)
for i = tonumber(ARGV[3]), #live do doomed[#doomed + 1] = live[i] end
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
extend(KEYS[2], ARGV[2])
return forget(KEYS[2], ARGV[4], doomed, p)
"""

# KEYS: session, index. ARGV: now, ttl ms, id, last_active_at, expires_at (ttl and both
# times '' to keep the times and TTLs as they are), new digest or '', key prefix on a
# single server or '{' in a cluster, tag, size cap or '', the digest the session must hold
# or '' (any), the time until which a rotation keeps the digest it rotates away from or
# '' (none kept), the TTL in ms of that digest's pointer (0: none), the time the session
# must have been last active by for the times to apply or '' (any), n, n removed fields,
# field/value pairs.
# Returns nil if not live (or not under the digest it must hold), -1 if the new digest is
# another session's (single server; a cluster claims it before), the size (an integer) if
# the merged data would exceed the cap (nothing changed in either case), else the digest
# it had (run again, as a retry, a rotation answers as it first did); for a rotation that
# keeps the digest it rotates away from, that digest and the one an earlier rotation kept
# (or ''), whose pointer goes; and when the session was last active after the time given,
# which keeps its times as stored, the digest it had, that kept digest (nil when none is),
# and the session's TTL in ms, which its pointers follow.
# The size is data_size()'s, from the stored texts: a field 'd:<key JSON>' holding
# <value JSON> adds #key + 1 + #value (#field - 1 + #value), each after the first a comma.
UPDATE = """
local f = redis.call('HMGET', KEYS[1], 'ea', 'td')
if not f[1] or tonumber(f[1]) <= tonumber(ARGV[1]) then return false end
local had = f[2]
if ARGV[10] ~= '' and had ~= ARGV[10] then
  -- Holding the new digest, this rotation ran already: a client's retry after its reply
  -- was lost, which runs again as the first did, from the digest rotated away. Not while
  -- that digest still names a session (the first run let go of it): this one never held it.
  if had ~= ARGV[6] then return false end
  if ARGV[7] ~= '{' then
    local _, expected_key = pointer_keys(ARGV[7], ARGV[3], ARGV[10])
    if redis.call('EXISTS', expected_key) == 1 then return false end
  end
  had = ARGV[10]
end
if ARGV[6] ~= '' and ARGV[7] ~= '{' then
  local _, new_digest_key = pointer_keys(ARGV[7], ARGV[3], ARGV[6])
  local holder = redis.call('GET', new_digest_key)
  if holder and holder ~= ARGV[8] .. ':' .. ARGV[3] then return -1 end
end
local n = tonumber(ARGV[14])
if ARGV[9] ~= '' then
  local size, count, named = 0, 0, {}
  for i = 15, 14 + n do named[ARGV[i]] = true end
  for i = 15 + n, #ARGV, 2 do
    named[ARGV[i]] = true
    size, count = size + #ARGV[i] - 1 + #ARGV[i + 1], count + 1
  end
  local h = redis.call('HGETALL', KEYS[1])
  for i = 1, #h, 2 do
    if not named[h[i]] and string.sub(h[i], 1, 2) == 'd:' then
      size, count = size + #h[i] - 1 + #h[i + 1], count + 1
    end
  end
  size = size + math.max(count + 1, 2)
  if size > tonumber(ARGV[9]) then return size end
end
hdel_range(KEYS[1], 15, 14 + n)
hset_from(KEYS[1], 15 + n)
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'td', ARGV[6]) end
local kept
if ARGV[11] ~= '' and had ~= ARGV[6] then
  -- The session keeps one digest rotated away from, its latest rotation's (a "rotation"
  -- to the digest it holds rotates away from none). Run again, as a retry, this rotation
  -- finds its own digest kept already, and keeps it again.
  kept = redis.call('HGET', KEYS[1], 'ra') or ''
  if kept == had then kept = '' end
  redis.call('HSET', KEYS[1], 'ra', had, 'ru', ARGV[11])
end
if ARGV[2] == '' then return had end
local ttl = ARGV[2]
-- Last active after the time given, the session keeps its stored times, and the pointers
-- follow its own expiry.
local touched_since = ARGV[13] ~= ''
  and tonumber(redis.call('HGET', KEYS[1], 'la')) > tonumber(ARGV[13])
if touched_since then
  ttl = redis.call('PTTL', KEYS[1])
  if ARGV[6] == '' then return {had, false, ttl} end
else
  redis.call('HSET', KEYS[1], 'la', ARGV[4], 'ea', ARGV[5])
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
  extend(KEYS[2], ttl)
end
local p = ARGV[7]
if p ~= '{' then
  -- Single server: the pointers (elsewhere in a cluster) change in the same step.
  local id_key, digest_key = pointer_keys(p, ARGV[3], had)
  redis.call('PEXPIRE', id_key, ttl)
  if ARGV[6] == '' then
    redis.call('PEXPIRE', digest_key, ttl)
  else
    local _, new_digest_key = pointer_keys(p, ARGV[3], ARGV[6])
    redis.call('DEL', digest_key)
    redis.call('SET', new_digest_key, ARGV[8] .. ':' .. ARGV[3], 'PX', ttl)
  end
  if kept then
    if kept ~= '' then redis.call('DEL', p .. 'r:' .. kept) end
    if ARGV[12] ~= '0' then
      redis.call('SET', p .. 'r:' .. had, ARGV[8] .. ':' .. ARGV[3], 'PX', ARGV[12])
    end
  end
end
if touched_since then return {had, kept or false, ttl} end
if kept then return {had, kept} end
return had
"""

# A delete that ended something keeps its answer for a minute under a key of the call's
# own, in the slot of the keys it changed: a client's retry after the reply was lost finds
# the first run's answer, where it found nothing left to delete (a revoke answered "not
# found", a logout everywhere 0, and a cluster's pointers stayed).
RETRY_ANSWER_MS = 60_000

# KEYS: session, index, the call's answer key. ARGV: id, '1' to require the owner, owner,
# key prefix on a single server (the pointers go too) or '{' in a cluster, now, the digest
# the session must hold ('' for any). Returns the digest, 1 if the session was live (0 if
# expired, not yet gone by its TTL), and the digest it was rotated away from (or '').
DELETE = """
local answered = redis.call('GET', KEYS[3])
if answered then return cjson.decode(answered) end
local f = redis.call('HMGET', KEYS[1], 'uid', 'td', 'ea', 'ra')
if not f[1] then redis.call('ZREM', KEYS[2], ARGV[1]) return false end
if ARGV[2] == '1' and f[1] ~= ARGV[3] then return false end
if ARGV[6] ~= '' and f[2] ~= ARGV[6] then return false end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
drop_pointers(ARGV[4], ARGV[1], f[2], f[4])
local out = {f[2], tonumber(f[3]) > tonumber(ARGV[5]) and 1 or 0, f[4] or ''}
redis.call('SET', KEYS[3], cjson.encode(out), 'PX', RETRY_ANSWER_MS)
return out
""".replace("RETRY_ANSWER_MS", str(RETRY_ANSWER_MS))

# KEYS: index, the call's answer key. ARGV: session key prefix, id to keep, key prefix on
# a single server (the pointers go too) or '{' in a cluster, now. Returns how many of the
# deleted sessions were live, then the deleted (id, digest, digest rotated away from or
# '') triples.
DELETE_FOR_USER = """
local answered = redis.call('GET', KEYS[2])
if answered then return cjson.decode(answered) end
local now, live, doomed = tonumber(ARGV[4]), 0, {}
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  if sid ~= ARGV[2] then
    local f = redis.call('HMGET', ARGV[1] .. sid, 'td', 'ea', 'ra')
    if f[1] then
      doomed[#doomed + 1] = {sid, f[1], f[3]}
      if tonumber(f[2]) > now then live = live + 1 end
    else
      redis.call('ZREM', KEYS[1], sid)
    end
  end
end
local out = forget(KEYS[1], ARGV[1], doomed, ARGV[3])
table.insert(out, 1, live)
if #out > 1 then
  redis.call('SET', KEYS[2], cjson.encode(out), 'PX', RETRY_ANSWER_MS)
end
return out
""".replace("RETRY_ANSWER_MS", str(RETRY_ANSWER_MS))

# A session travels as one JSON text, decoded once by the caller: redis-py parses a reply
# element by element in Python (a session's hash is two dozen of them), and decoding
# each data key and value apart costs as much again. The text is an array: ``first``,
# then the columns in SessionRecord's order (cjson: all strings, or null, so exact),
# then the data as one object joined from its stored texts ('d:<key JSON>' holding
# <value JSON>).
RECORD_JSON = """
local function record_json(first, h)
  local f, data, null = {}, {}, cjson.null
  for i = 1, #h, 2 do
    local name = h[i]
    if string.sub(name, 1, 2) == 'd:' then
      data[#data + 1] = string.sub(name, 3) .. ':' .. h[i + 1]
    else
      f[name] = h[i + 1]
    end
  end
  local head = cjson.encode({first, f.id or null, f.td or null, f.uid or null,
    f.ip or null, f.ua or null, f.dn or null, f.dt or null, f.fp or null,
    f.ca or null, f.la or null, f.ea or null})
  return string.sub(head, 1, -2) .. ',{' .. table.concat(data, ',') .. '}]'
end
"""

# KEYS: index. ARGV: session key prefix. Returns every stored session (expired ones too),
# as RECORD_JSON texts.
LIST = """
local out = {}
for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local h = redis.call('HGETALL', ARGV[1] .. sid)
  if #h == 0 then
    redis.call('ZREM', KEYS[1], sid)
  else
    out[#out + 1] = record_json(cjson.null, h)
  end
end
return out
"""

# KEYS: session. Returns the session as a RECORD_JSON text, or nil when it is gone.
READ = """
local h = redis.call('HGETALL', KEYS[1])
if #h == 0 then return false end
return record_json(cjson.null, h)
"""

# KEYS: indexes (of one slot, in a cluster); each index's sessions are under its key with
# the final "u" replaced by "s:". ARGV: now, limit, key prefix on a single server (the
# deleted sessions' pointers go too) or '{' in a cluster. Sweeps the indexes in order until
# `limit` sessions are found, then deletes them: reading everything first means an error
# (a damaged hash) deletes nothing, leaving no pointer of a deleted session to the caller.
# Returns the count removed, how many indexes were swept to the end, then the deleted
# (id, digest, digest rotated away from or '') triples.
DELETE_EXPIRED = """
local now, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local found, swept, gone, doomed, seen = 0, 0, {}, {}, {}
for _, index in ipairs(KEYS) do
  -- SCAN may hand out an index twice: read it once, or its sessions would count twice.
  if not seen[index] then
    seen[index] = true
    local prefix = string.sub(index, 1, -2) .. 's:'
    local cut = false
    for _, sid in ipairs(redis.call('ZRANGE', index, 0, -1)) do
      if found >= limit then cut = true; break end
      local f = redis.call('HMGET', prefix .. sid, 'ea', 'td', 'ra')
      if not f[1] then
        gone[#gone + 1] = {index, sid}
        found = found + 1
      elseif tonumber(f[1]) <= now then
        doomed[#doomed + 1] = {index, prefix .. sid, sid, f[2], f[3]}
        found = found + 1
      end
    end
    if cut then break end
  end
  swept = swept + 1
end
local out = {found, swept}
for _, g in ipairs(gone) do redis.call('ZREM', g[1], g[2]) end
for _, d in ipairs(doomed) do
  redis.call('DEL', d[2])
  redis.call('ZREM', d[1], d[3])
  drop_pointers(ARGV[3], d[3], d[4], d[5])
  out[#out + 1] = d[3]
  out[#out + 1] = d[4]
  out[#out + 1] = d[5] or ''
end
return out
"""

# Single server only: reads a key KEYS does not name, which a cluster may hold elsewhere.
# KEYS: digest pointer. ARGV: key prefix. Returns the session as a RECORD_JSON text led by
# the pointer, or nil when either is gone.
FOLLOW = """
local loc = redis.call('GET', KEYS[1])
if not loc then return false end
local tag, sid = string.match(loc, '^(%x+):(.+)$')
local h = redis.call('HGETALL', ARGV[1] .. '{' .. tag .. '}:s:' .. sid)
if #h == 0 then return false end
return record_json(loc, h)
"""

# Whether the session hash at `key` is live and keeps `digest` as the one it was rotated
# away from, until after `now`. Prepended to the two scripts below.
KEEPS_ROTATED_AWAY = """
local function keeps_rotated_away(key, digest, now)
  local f = redis.call('HMGET', key, 'ra', 'ru', 'ea')
  return f[1] == digest and tonumber(f[2]) > now and tonumber(f[3]) > now
end
"""

# Single server only: reads a key KEYS does not name, which a cluster may hold elsewhere.
# KEYS: rotated-away digest pointer. ARGV: key prefix, the digest, now. Returns the id of
# the session the pointer names if it keeps the digest (see KEEPS_ROTATED_AWAY), else nil.
ROTATED_AWAY = """
local loc = redis.call('GET', KEYS[1])
if not loc then return false end
local tag, sid = string.match(loc, '^(%x+):(.+)$')
local key = ARGV[1] .. '{' .. tag .. '}:s:' .. sid
if keeps_rotated_away(key, ARGV[2], tonumber(ARGV[3])) then return sid end
return false
"""

# In a cluster, once the pointer is read. KEYS: session. ARGV: the digest, now. Returns 1
# if the session keeps the digest (see KEEPS_ROTATED_AWAY), else nil.
KEEPS_ROTATED_AWAY_ON = """
if keeps_rotated_away(KEYS[1], ARGV[1], tonumber(ARGV[2])) then return 1 end
return false
"""
