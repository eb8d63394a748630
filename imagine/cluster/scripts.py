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
-- Record a job's end once: its state, its last event, and that it is no longer unfinished. A listed job
-- still counts against its subject, as one of its `finished` ones, until SUBMIT forgets it or it expires.
-- A job submitted with `after_end` fields (a webhook, a quota charge) is queued in `after_end` at once.
local function finish(job, events, unfinished, finished, after_end, job_id, status, payload, event_data, ttl, now)
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
  if redis.call('HGET', job, 'visible') == '1' then
    redis.call('ZADD', finished, tonumber(now), job_id)
    -- The set outlives none of its jobs by more than the TTL: an idle subject's goes with its last job.
    redis.call('EXPIRE', finished, ttl)
  end
  if redis.call('HEXISTS', job, 'after_end') == 1 then
    redis.call('ZADD', after_end, 'NX', tonumber(now), job_id)
  end
  return 1
end
"""

# KEYS: waiting, sequence, subjects, served, streams, bell, stream, job, events, unfinished, idempotency,
#       finished, after_end
# ARGV: job id, capacity, max per subject, ttl s, has idempotency key (0/1), enqueue (0/1),
#       seconds per position (for the ETA), job fields (JSON object of strings), visible (0/1),
#       key names of any job (JSON: "job", "events", "delivery", each with %s for the id),
#       entry fields (flat, from 11 on)
# A visible job counts against its subject's jobs.max_per_subject, finished or not; a /generate waited for
# does not. Past the bound the subject's oldest finished jobs are forgotten, in this same step, so replicas
# submitting at once can neither overshoot it nor forget more than one submission needs.
# Returns {"ok", position} | {"replay", job id} | {"full", depth}
#       | {"too_many", how many finished jobs were spared because their follow-up has not read them yet}
SUBMIT = """
-- The subject's finished jobs to forget so that one more job fits `limit`, oldest first; nil when even
-- forgetting all of them would not make room, with how many were spared. A job whose follow-up
-- (keys.AFTER_END) has not read it yet (no delivery made of it) is spared: the outbox reads the job's
-- record to refund its quota and build its webhook, and would find nothing. That is normally a second.
local function room_for_one(unfinished, finished, after_end, limit, names)
  local excess = redis.call('SCARD', unfinished) + redis.call('ZCARD', finished) - limit + 1
  if excess > 0 then
    -- An unfinished job whose record expired (it waited out its TTL with no worker to take it) ended
    -- unrecorded: it holds none of the caller's room.
    for _, id in ipairs(redis.call('SMEMBERS', unfinished)) do
      if redis.call('EXISTS', string.format(names.job, id)) == 0 then
        redis.call('SREM', unfinished, id)
        excess = excess - 1
      end
    end
  end
  local forget = {}
  local spared = 0
  local start = 0
  while excess > 0 do
    local oldest = redis.call('ZRANGE', finished, start, start + 31)
    if #oldest == 0 then return nil, spared end
    start = start + #oldest
    for _, id in ipairs(oldest) do
      if excess > 0 then
        if redis.call('EXISTS', string.format(names.job, id)) == 0 then
          -- It expired with its TTL: it no longer counts, and dropping its id takes nothing away.
          redis.call('ZREM', finished, id)
          start = start - 1
          excess = excess - 1
        elseif redis.call('ZSCORE', after_end, id) and redis.call('EXISTS', string.format(names.delivery, id)) == 0 then
          spared = spared + 1
        else
          forget[#forget + 1] = id
          excess = excess - 1
        end
      end
    end
  end
  return forget, 0
end

-- A forgotten job is gone as if expired: its record, its events, and the Idempotency-Key that named it.
local function forget_job(finished, names, id)
  local job = string.format(names.job, id)
  local idempotency = redis.call('HGET', job, 'idempotency')
  if idempotency and redis.call('GET', idempotency) == id then redis.call('DEL', idempotency) end
  redis.call('DEL', job, string.format(names.events, id))
  redis.call('ZREM', finished, id)
end

local job_id = ARGV[1]
local names = cjson.decode(ARGV[10])
if ARGV[5] == '1' then
  local earlier = redis.call('GET', KEYS[11])
  -- A key outlives a job that ended early (the key lasts from submission, the job's record from its
  -- end): once the job is gone the key names nothing, and this is a new submission.
  if earlier and redis.call('EXISTS', string.format(names.job, earlier)) == 1 then return {'replay', earlier} end
end
local enqueue = ARGV[6] == '1'
local depth = redis.call('ZCARD', KEYS[1])
if enqueue and depth >= tonumber(ARGV[2]) then return {'full', tostring(depth)} end
local visible = ARGV[9] == '1'
local forget = {}
if visible then
  local spared
  forget, spared = room_for_one(KEYS[10], KEYS[12], KEYS[13], tonumber(ARGV[3]), names)
  if forget == nil then return {'too_many', tostring(spared)} end
end
local ttl = tonumber(ARGV[4])
local fields = cjson.decode(ARGV[8])
-- So that forgetting the job also forgets the key that replays it.
if ARGV[5] == '1' then fields['idempotency'] = KEYS[11] end
local position = 0
if enqueue then
  if redis.call('EXISTS', KEYS[7]) == 0 then
    redis.call('XGROUP', 'CREATE', KEYS[7], 'workers', '0', 'MKSTREAM')
  end
  fields['entry'] = redis.call('XADD', KEYS[7], '*', unpack(ARGV, 11, #ARGV))
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
-- Only now that the job is in: a refused submission forgets nothing.
for _, id in ipairs(forget) do forget_job(KEYS[12], names, id) end
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

# KEYS: job, events, unfinished, done, after_end, finished
# ARGV: job id, status, payload, event data, ttl, now, images, error status, error Retry-After
FINISH = (
    _FINISH_HELPER
    + """
local done = finish(KEYS[1], KEYS[2], KEYS[3], KEYS[6], KEYS[5], ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6])
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

# KEYS: job, waiting, events, unfinished, streams, subjects, after_end, finished
# ARGV: job id, error JSON, ttl, now
# Returns the job's state after the call: "cancelled" when it had not started (removed now if waiting),
# "signalled" when a worker holds it (it stops at its next step), a terminal state, or "missing".
CANCEL = (
    _STREAM_HELPERS
    + _FINISH_HELPER
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status == 'succeeded' or status == 'failed' or status == 'cancelled' then return status end
local waiting = redis.call('ZREM', KEYS[2], ARGV[1]) == 1
if waiting then
  local stream = redis.call('HGET', KEYS[1], 'stream')
  redis.call('XDEL', stream, redis.call('HGET', KEYS[1], 'entry'))
  forget_if_empty(stream, KEYS[5], KEYS[6])
elseif status == 'queued' then
  -- Taken by a worker that has not started it (START would have made it running), maybe one that died,
  -- or a cloud job not sent yet: it ends now. A worker's START then finds it done and acknowledges it;
  -- the replica running a cloud job hears the cancel and stops.
  redis.call('PUBLISH', 'imagine:cancel', ARGV[1])
end
if waiting or status == 'queued' then
  finish(KEYS[1], KEYS[3], KEYS[4], KEYS[8], KEYS[7], ARGV[1], 'cancelled', ARGV[2], ARGV[2], tonumber(ARGV[3]), ARGV[4])
  return 'cancelled'
end
redis.call('HSET', KEYS[1], 'cancel', '1')
redis.call('PUBLISH', 'imagine:cancel', ARGV[1])
return 'signalled'
"""
)
