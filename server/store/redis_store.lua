-- Sluice's Redis store: every operation on one stream, as ONE script (one SHA to load).
-- ARGV[1] names the operation; each operation runs atomically (Redis runs a script alone), and
-- its KEYS and ARGV are listed above it. The data model is described in
-- server/store/redis_keys.py and docs/ARCHITECTURE.md:
--   <prefix>{<stream>}:meta  hash: epoch, last (newest seq issued), closed (0/1), ts (newest
--                            stamp, ms), cum (bytes appended since the stream was created),
--                            gen (the lineage generation of its last write), and once
--                            relabelled: prev (the epoch before), pivot (the last seq then)
--   <prefix>{<stream>}:log   stream: entry id <seq>-0, fields in this order: t (type), d (data),
--                            b (1: binary), s (stamp, ms), c (cum before this event)
--   <prefix>ages             sorted set: stream -> stamp of its oldest retained event
--   <prefix>lineage          hash: rid (master_replid of the server run that last checked it),
--                            gen (the generation, bumped when a promoted server first checks it)
--   <prefix>idem:<key>       hash (keyed appends only): stream, epoch, first, count, ts, fp
-- Retained events are always one contiguous run of seqs ending at `last`, so the first retained
-- seq is last - XLEN + 1. Numbers are integers below 2^53, written with '%d' (never %g).

local function n(x)
  return string.format('%d', x)
end

local function eid(seq)
  return n(seq) .. '-0'
end

-- The fields of the retained event `seq` ({'t', type, 'd', data, 'b', bin, 's', stamp, 'c', cum}).
local function fields_at(log, seq)
  return redis.call('XRANGE', log, eid(seq), eid(seq))[1][2]
end

local function stamp_at(log, seq)
  return tonumber(fields_at(log, seq)[8])
end

local function cum_at(log, seq)
  return tonumber(fields_at(log, seq)[10])
end

-- The smallest s in lo..hi for which pred(s) holds (pred false then true), or hi + 1.
local function first_true(lo, hi, pred)
  while lo <= hi do
    local mid = math.floor((lo + hi) / 2)
    if pred(mid) then hi = mid - 1 else lo = mid + 1 end
  end
  return lo
end

-- Drop the retained events older than now - max_age; return the new first seq and how many went.
local function expire(log, first, last, now, max_age)
  if max_age <= 0 or first > last then return first, 0 end
  local cutoff = now - max_age
  if stamp_at(log, first) >= cutoff then return first, 0 end
  local cut = first_true(first, last, function(s) return stamp_at(log, s) >= cutoff end)
  redis.call('XTRIM', log, 'MINID', eid(cut))
  return cut, cut - first
end

-- Apply every retention limit after an append; the newest event always stays. Returns the new first seq.
local function enforce(log, first, last, cum, now, max_events, max_bytes, max_age)
  first = expire(log, first, last, now, max_age)
  if max_events > 0 and last - first + 1 > max_events then
    redis.call('XTRIM', log, 'MAXLEN', n(max_events))
    first = last - max_events + 1
  end
  if max_bytes > 0 and first < last and cum - cum_at(log, first) > max_bytes then
    local cut = first_true(first, last, function(s) return cum - cum_at(log, s) <= max_bytes end)
    if cut > last then cut = last end
    redis.call('XTRIM', log, 'MINID', eid(cut))
    first = cut
  end
  return first
end

-- Record in the ages index when the stream's oldest retained event was stamped (or that it has none).
local function index_age(log, ages, stream, first, last)
  if first <= last then
    redis.call('ZADD', ages, stamp_at(log, first), stream)
  else
    redis.call('ZREM', ages, stream)
  end
end

-- Failover. A replica promoted to primary may lack the last writes its primary acknowledged; a
-- stream that goes on in the same epoch would then issue their seqs again to other events. So
-- every server run that has been a replica (INFO replication: master_replid2 set, which a restart
-- of a primary from its own AOF clears) starts a new lineage generation the first time a call
-- checks it, and a strict call (the worker's store.redis_wait_replicas = 0, or a stream whose last
-- write may not have reached a replica) relabels an open stream last written under another
-- generation: a new epoch, its retained events kept under their seqs (they are a prefix of what
-- the old primary held), the old epoch and last seq kept as prev and pivot for idempotency.

local NO_REPLID = string.rep('0', 40)

-- The 40-hex-digit field `name` of an INFO replication text.
local function replid(info, name)
  local at = string.find(info, name .. ':', 1, true)
  return string.sub(info, at + #name + 1, at + #name + 40)
end

-- This server's lineage generation (text), checked against INFO replication at every call.
local function generation(lineage)
  local info = redis.call('INFO', 'replication')
  local rid = replid(info, 'master_replid')
  local l = redis.call('HMGET', lineage, 'rid', 'gen')
  if l[1] == rid then return l[2] end
  local gen = tonumber(l[2] or '0')
  if replid(info, 'master_replid2') ~= NO_REPLID then gen = gen + 1 end
  gen = n(gen)
  redis.call('HSET', lineage, 'rid', rid, 'gen', gen)
  return gen
end

-- Whether an open stream whose meta says epoch, closed, gen must be relabelled under `current`.
local function stale(epoch, closed, gen, current, strict)
  return strict == '1' and epoch and closed ~= '1' and (gen or '0') ~= current
end

-- Give the stream `epoch` in place of `old` (its last seq `last`), keeping its events.
local function relabel(meta, old, last, epoch, gen)
  redis.call('HSET', meta, 'epoch', epoch, 'prev', old, 'pivot', last, 'gen', gen)
end

-- Whether an idempotency record made in `epoch` for seqs first..first+count-1 still names events
-- of a stream whose meta says epoch, prev, pivot (the record's epoch, or the one it was relabelled from).
local function live_in(rec_epoch, first, count, epoch, prev, pivot)
  if rec_epoch == epoch then return true end
  return prev and rec_epoch == prev and tonumber(first) + tonumber(count) - 1 <= tonumber(pivot)
end

-- KEYS: meta, log, ages, lineage[, idem]. ARGV: op, now, new epoch, max_events, max_bytes, max_age,
-- window, stream, prefix, fingerprint, count, strict (1/0), then type, data, binary for each
-- event. Returns {'ok', epoch, first seq}, {'dup', epoch, first seq, count}, {'closed'} or {'reused'}.
local function append()
  local meta, log, ages, lineage, idem = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
  local now, window = tonumber(ARGV[2]), tonumber(ARGV[7])
  local stream, fp = ARGV[8], ARGV[10]
  local m = redis.call('HMGET', meta, 'epoch', 'last', 'closed', 'ts', 'cum', 'gen', 'prev', 'pivot')
  local gen = generation(lineage)
  if stale(m[1], m[3], m[6], gen, ARGV[12]) then
    relabel(meta, m[1], m[2], ARGV[3], gen)
    m[1], m[7], m[8] = ARGV[3], m[1], m[2]
  end
  if idem then
    local k = redis.call('HMGET', idem, 'stream', 'epoch', 'first', 'count', 'ts', 'fp')
    if k[1] and (window <= 0 or now - tonumber(k[5]) < window) then
      -- A record is live only while its stream still holds the events it names.
      local s = m
      if k[1] ~= stream then
        s = redis.call('HMGET', ARGV[9] .. '{' .. k[1] .. '}:meta', 'epoch', 'last', 'closed', 'ts', 'cum', 'gen',
          'prev', 'pivot')
      end
      if s[1] and live_in(k[2], k[3], k[4], s[1], s[7], s[8]) then
        if k[1] ~= stream or k[6] ~= fp then return {'reused'} end
        return {'dup', m[1], k[3], k[4]}
      end
    end
  end
  local epoch, last, ts, cum
  if m[1] then
    if m[3] == '1' then return {'closed'} end
    epoch, last, ts, cum = m[1], tonumber(m[2]), tonumber(m[4]), tonumber(m[5])
  else
    epoch, last, ts, cum = ARGV[3], 0, now, 0
    redis.call('DEL', log)
  end
  local first = last - redis.call('XLEN', log) + 1
  local stamp = math.max(now, ts)
  local count = tonumber(ARGV[11])
  local first_new = last + 1
  for i = 0, count - 1 do
    local at = 13 + 3 * i
    redis.call('XADD', log, eid(first_new + i), 't', ARGV[at], 'd', ARGV[at + 1], 'b', ARGV[at + 2],
      's', n(stamp), 'c', n(cum))
    cum = cum + string.len(ARGV[at + 1])
  end
  last = last + count
  redis.call('HSET', meta, 'epoch', epoch, 'last', n(last), 'closed', '0', 'ts', n(stamp), 'cum', n(cum), 'gen', gen)
  first = enforce(log, first, last, cum, now, tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]))
  index_age(log, ages, stream, first, last)
  if idem then
    redis.call('HSET', idem, 'stream', stream, 'epoch', epoch, 'first', n(first_new), 'count', n(count),
      'ts', n(now), 'fp', fp)
    if window > 0 then redis.call('PEXPIRE', idem, n(window)) end
  end
  return {'ok', epoch, n(first_new)}
end

-- KEYS: meta, log, lineage. ARGV: op, now, new epoch, strict (1/0). Returns {changed (0/1), epoch,
-- last, retained count}.
local function close()
  local meta, log = KEYS[1], KEYS[2]
  local m = redis.call('HMGET', meta, 'epoch', 'last', 'closed', 'gen')
  local gen = generation(KEYS[3])
  if not m[1] then
    redis.call('DEL', log)
    redis.call('HSET', meta, 'epoch', ARGV[3], 'last', '0', 'closed', '1', 'ts', ARGV[2], 'cum', '0', 'gen', gen)
    return {1, ARGV[3], '0', 0}
  end
  local len = redis.call('XLEN', log)
  if m[3] == '1' then return {0, m[1], m[2], len} end
  if stale(m[1], m[3], m[4], gen, ARGV[4]) then
    relabel(meta, m[1], m[2], ARGV[3], gen)
    m[1] = ARGV[3]
  end
  redis.call('HSET', meta, 'closed', '1', 'gen', gen)
  return {1, m[1], m[2], len}
end

-- ARGV: op, stream. Returns 1 when the stream existed, else 0.
local function delete()
  local existed = redis.call('EXISTS', KEYS[1])
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  return existed
end

-- ARGV: op, now, max_age, stream. Drops the stream's expired events; returns how many.
local function trim()
  local meta, log, ages, stream = KEYS[1], KEYS[2], KEYS[3], ARGV[4]
  local last = redis.call('HGET', meta, 'last')
  if not last then
    redis.call('ZREM', ages, stream)
    return 0
  end
  last = tonumber(last)
  local first, dropped = expire(log, last - redis.call('XLEN', log) + 1, last, tonumber(ARGV[2]), tonumber(ARGV[3]))
  index_age(log, ages, stream, first, last)
  return dropped
end

-- KEYS: meta, log, lineage. ARGV: op, first entry id to return, most entries to return (0: none),
-- strict (1/0), new epoch. Returns nil for a missing stream, else {epoch, last, closed, retained
-- count, entries}. Only a strict read checks the lineage (and may relabel the stream).
local function read()
  local m = redis.call('HMGET', KEYS[1], 'epoch', 'last', 'closed', 'gen')
  if not m[1] then return false end
  if ARGV[4] == '1' and m[3] ~= '1' then
    local gen = generation(KEYS[3])
    if stale(m[1], m[3], m[4], gen, ARGV[4]) then
      relabel(KEYS[1], m[1], m[2], ARGV[5], gen)
      m[1] = ARGV[5]
    end
  end
  local len = redis.call('XLEN', KEYS[2])
  local entries = {}
  local limit = tonumber(ARGV[3])
  if limit > 0 and len > 0 then
    entries = redis.call('XRANGE', KEYS[2], ARGV[2], '+', 'COUNT', ARGV[3])
  end
  return {m[1], m[2], m[3], len, entries}
end

local ops = {append = append, close = close, delete = delete, trim = trim, read = read}
local op = ops[ARGV[1]]
if not op then return redis.error_reply('ERR sluice: unknown store operation') end
return op()
