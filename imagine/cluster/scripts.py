"""The Lua scripts of the shared queue: each is one atomic step, so replicas never see a half-made change.

Redis runs a script alone, so a submission's capacity check and its entry,
a batch's choice and its delivery, or a cancel and the entry it removes can
never interleave with another replica's.
"""

from __future__ import annotations

# Helpers every script that looks at a stream's next entry shares.
_STREAM_HELPERS = """
local function field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

-- The oldest entry of `stream` that no worker has been given yet, or nil.
local function next_waiting(stream)
  if redis.call('EXISTS', stream) == 0 then return nil end
  local last = '0-0'
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name = field(group, 'name')
    if name == 'workers' then last = field(group, 'last-delivered-id') end
  end
  return redis.call('XRANGE', stream, '(' .. last, '+', 'COUNT', 1)[1]
end

-- After an entry left `stream` for good: an empty stream goes, with its consumer group.
local function forget_if_empty(stream, streams, subjects)
  if redis.call('XLEN', stream) == 0 then
    redis.call('DEL', stream)
    redis.call('SREM', streams, stream)
    redis.call('ZREM', subjects, stream)
  end
end
"""

_FINISH_HELPER = """
-- Record a job's end once: its state, its last event, and that it no longer counts against its subject.
-- A job submitted with `after_end` fields (a webhook, a quota charge) is queued in `after_end` at once.
local function finish(job, events, unfinished, after_end, job_id, status, payload, event_data, ttl, now)
  local current = redis.call('HGET', job, 'status')
  if (not current) or current == 'succeeded' or current == 'failed' or current == 'cancelled' then
    return 0
  end
  redis.call('HSET', job, 'status', status, 'finished_at', now)
  if status == 'succeeded' then
    redis.call('HSET', job, 'result', payload)
  else
    redis.call('HSET', job, 'error', payload)
  end
  redis.call('XADD', events, '*', 'type', status, 'data', event_data)
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', events, ttl)
  redis.call('SREM', unfinished, job_id)
  if redis.call('HEXISTS', job, 'after_end') == 1 then
    redis.call('ZADD', after_end, 'NX', tonumber(now), job_id)
  end
  return 1
end
"""

# KEYS: waiting, sequence, subjects, served, streams, bell, stream, job, events, unfinished, idempotency
# ARGV: job id, capacity, max per subject, ttl s, has idempotency key (0/1), enqueue (0/1),
#       seconds per position (for the ETA), job fields (JSON object of strings), visible (0/1),
#       entry fields (flat, from 10 on)
# A visible job counts against its subject's jobs.max_per_subject; a /generate waited for does not.
# Returns {"ok", position} | {"replay", job id} | {"full", depth} | {"too_many", ""}
SUBMIT = """
local job_id = ARGV[1]
if ARGV[5] == '1' then
  local earlier = redis.call('GET', KEYS[11])
  if earlier then return {'replay', earlier} end
end
local enqueue = ARGV[6] == '1'
local depth = redis.call('ZCARD', KEYS[1])
if enqueue and depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
local visible = ARGV[9] == '1'
if visible and redis.call('SCARD', KEYS[10]) >= tonumber(ARGV[3]) then return {'too_many', ''} end
local ttl = tonumber(ARGV[4])
local fields = cjson.decode(ARGV[8])
local position = 0
if enqueue then
  if redis.call('EXISTS', KEYS[7]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[7], 'workers', '0', 'MKSTREAM')
  end
  fields['entry'] = redis.call('XADD', KEYS[7], '*', unpack(ARGV, 10, #ARGV))
  fields['stream'] = KEYS[7]
  redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), job_id)
  position = redis.call('ZRANK', KEYS[1], job_id) + 1
  redis.call('ZADD', KEYS[3], 'NX', redis.call('HGET', KEYS[4], KEYS[7]) or 0, KEYS[7])
  redis.call('SADD', KEYS[5], KEYS[7])
  redis.call('LPUSH', KEYS[6], '1')
  redis.call('LTRIM', KEYS[6], 0, 255)
end
local eta = position * tonumber(ARGV[7])
fields['status'] = 'queued'
fields['visible'] = ARGV[9]
fields['accepted_position'] = tostring(position)
fields['accepted_eta'] = string.format('%.2f', eta)
for name, value in pairs(fields) do redis.call('HSET', KEYS[8], name, value) end
redis.call('EXPIRE', KEYS[8], ttl)
if visible then redis.call('SADD', KEYS[10], job_id) end
if ARGV[5] == '1' then redis.call('SET', KEYS[11], job_id, 'EX', ttl) end
redis.call('XADD', KEYS[9], '*', 'type', 'queued',
  'data', string.format('{"position": %d, "eta_seconds": %.2f}', position, eta))
redis.call('EXPIRE', KEYS[9], ttl)
return {'ok', tostring(position)}
"""

# KEYS: subjects, waiting, served, turn
# ARGV: consumer, max images, how many subjects to consider
# Returns {{stream, entry id, fields}, ...}: a batch, fair across subjects and compatible within itself.
TAKE = (
    _STREAM_HELPERS
    + """
local room = tonumber(ARGV[2])
local order = redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[3]) - 1)
local open = order
local taken = {}
local key = nil
local turn = nil
-- Rounds: each subject still giving compatible work adds one entry per round.
while room > 0 and #open > 0 do
  local still = {}
  local head_stream = nil
  for _, stream in ipairs(open) do
    local head = room > 0 and next_waiting(stream) or nil
    if head ~= nil then
      local images = tonumber(field(head[2], 'images'))
      local entry_key = field(head[2], 'batch_key')
      -- The first entry starts the batch whatever its size; the others join when they fit.
      if key == nil or (entry_key == key and images <= room) then
        local entry = redis.call('XREADGROUP', 'GROUP', 'workers', ARGV[1], 'COUNT', 1, 'STREAMS', stream, '>')[1][2][1]
        if turn == nil then
          turn = redis.call('INCR', KEYS[4])
          head_stream = stream
        else
          still[#still + 1] = stream
        end
        key = entry_key
        room = room - images
        redis.call('ZREM', KEYS[2], field(entry[2], 'job'))
        redis.call('HSET', KEYS[3], stream, turn)
        redis.call('ZADD', KEYS[1], 'XX', turn, stream)
        taken[#taken + 1] = {stream, entry[1], entry[2]}
      end
      -- otherwise its next entry does not fit this batch, and keeps its place for the next
    end
  end
  -- The subject that started the batch already has its place in it: it comes last in the next round.
  if head_stream ~= nil then still[#still + 1] = head_stream end
  open = still
end
for _, stream in ipairs(order) do
  if next_waiting(stream) == nil then redis.call('ZREM', KEYS[1], stream) end
end
return taken
"""
)

# KEYS: stream, streams, subjects. ARGV: entry id. An entry whose outcome is stored leaves the stream.
ACK = (
    _STREAM_HELPERS
    + """
redis.call('XACK', KEYS[1], 'workers', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
forget_if_empty(KEYS[1], KEYS[2], KEYS[3])
return 1
"""
)

# KEYS: job, events, unfinished, done, after_end
# ARGV: job id, status, payload, event data, ttl, now, images, error status, error Retry-After
FINISH = (
    _FINISH_HELPER
    + """
local done = finish(KEYS[1], KEYS[2], KEYS[3], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6])
if done == 1 and ARGV[2] ~= 'succeeded' then
  redis.call('HSET', KEYS[1], 'error_status', ARGV[8], 'error_retry_after', ARGV[9])
end
if done == 1 and ARGV[2] == 'succeeded' then
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[1] .. ':' .. ARGV[7])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', tonumber(ARGV[6]) - 60)
end
return done
"""
)

# KEYS: job, events. ARGV: total steps, the worker's name, now.
# A worker about to run a job: "run", or why not ("cancel": asked to stop; "done": ended already; "missing").
START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return 'done' end
if redis.call('HGET', KEYS[1], 'cancel') == '1' then return 'cancel' end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'step', 0, 'worker', ARGV[2], 'started_at', ARGV[3])
-- A listed job, or a waited-for generation whose caller follows its start or its steps (records.OBSERVED_*).
local observed = redis.call('HGET', KEYS[1], 'observed')
if redis.call('HGET', KEYS[1], 'visible') == '1' or observed == 'start' or observed == '1' then
  redis.call('XADD', KEYS[2], '*', 'type', 'started', 'data', string.format('{"total": %d}', tonumber(ARGV[1])))
end
return 'run'
"""

# KEYS: job, waiting, events, unfinished, streams, subjects, after_end
# ARGV: job id, error JSON, ttl, now
# Returns the job's state after the call: "cancelled" when it was still waiting (removed now),
# "signalled" when a worker holds it (it stops at its next step), a terminal state, or "missing".
CANCEL = (
    _STREAM_HELPERS
    + _FINISH_HELPER
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  local stream = redis.call('HGET', KEYS[1], 'stream')
  redis.call('XDEL', stream, redis.call('HGET', KEYS[1], 'entry'))
  forget_if_empty(stream, KEYS[5], KEYS[6])
  finish(KEYS[1], KEYS[3], KEYS[4], KEYS[7], ARGV[1], 'cancelled', ARGV[2], ARGV[2], tonumber(ARGV[3]), ARGV[4])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('PUBLISH', 'imagine:cancel', ARGV[1])
return 'signalled'
"""
)
