-- One admission decision (shared.rs), and the credit a proxy leases with it (lease.rs).
-- KEYS: 1 rate hash, 2 spend hash, 3 users zset, 4 overflow user window, 5.. user windows.
-- ARGV: 1 rpm, 2 tpm, 3 tokens to reserve, 4 per-user requests/hour, 5 day budget, 6 month
-- budget (nano-USD, -1 none), 7 day seconds, 8 max users, 9 requests counted now (1, or 0 for a
-- credit refill alone), 10 extra requests, 11 extra tokens and 12 extra units per user window
-- wanted as credit, 13 the token unit (the asking request's reservation), 14 the least units of
-- credit worth granting, then (digest, count) per user window. 0 means "no such limit".
-- Nothing is written unless every limit admits the request. Credit is counted like admissions
-- (so the proxies together never pass a limit) and granted only from plenty: at most
-- 1/LEASE_SHARE of what a window has left, and at least the least units (of requests, user
-- units, or token units) or nothing, so near a limit every admission is decided here.
-- Returns {0, day spend, month spend, overflow, extra requests, extra tokens, minute, extra
-- units per user window in KEYS order} or a refusal: {1, retry ms} requests, {2, retry ms,
-- retryable} tokens, {3, retry ms} user, {4|5, period end s, spend, now s} budget.
local rpm, tpm, reserve = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local per_hour, budget_day, budget_month = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ds, max_users = tonumber(ARGV[7]), tonumber(ARGV[8])
local now_req = tonumber(ARGV[9] or 1)
local want_req, want_tok, want_user = tonumber(ARGV[10] or 0), tonumber(ARGV[11] or 0), tonumber(ARGV[12] or 0)
local token_unit, least = tonumber(ARGV[13] or 0), tonumber(ARGV[14] or 0)
local LEASE_SHARE = 32
local function credit(want, left, unit)
  local grant = math.min(want, math.floor(left / LEASE_SHARE))
  if grant < least * unit then return 0 end
  return grant
end

local day_id, day_end, month_id, month_end = periods(ds)
local dv, mv = spent(KEYS[2], day_id, month_id)
if budget_day >= 0 and dv >= budget_day then return {4, day_end, dv, now_s} end
if budget_month >= 0 and mv >= budget_month then return {5, month_end, mv, now_s} end

local new_tat
local grant_req, grant_tok = 0, 0
if rpm > 0 then
  local interval = 60000000 / rpm
  local tolerance = 60000000 - interval
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or now_us)
  if tat < now_us then tat = now_us end
  if tat - now_us > tolerance then
    return {1, math.ceil((tat - now_us - tolerance) / 1000)}
  end
  new_tat = tat + interval * now_req
  -- Credit: what this window could still admit now, of which at most 1/LEASE_SHARE.
  if want_req > 0 and new_tat - now_us <= tolerance then
    local left = math.floor((tolerance - (new_tat - now_us)) / interval) + 1
    grant_req = credit(want_req, left, 1)
    new_tat = new_tat + interval * grant_req
  end
end

local lvl
if tpm > 0 then lvl = level(KEYS[1], tpm) end
local new_lvl
if tpm > 0 and reserve > 0 then
  local have = lvl or tpm
  if reserve > tpm then return {2, 60000, 0} end
  if have < reserve then
    return {2, math.max(1, math.ceil((reserve - have) * 60000 / tpm)), 1}
  end
  new_lvl = have - reserve
end
if tpm > 0 and want_tok > 0 then
  local have = new_lvl or lvl or tpm
  if have > 0 then
    grant_tok = credit(want_tok, have, token_unit)
    if grant_tok > 0 then new_lvl = have - grant_tok end
  end
end

-- Per-user windows: one-minute buckets (hash field = minute) over the last hour.
local now_min = math.floor(now_us / 60000000)
local windows, order, slot, overflow = {}, {}, {}, 0
if per_hour > 0 then
  for i = 1, #KEYS - 4 do
    local digest, count = ARGV[13 + 2 * i], tonumber(ARGV[14 + 2 * i])
    local key = KEYS[4 + i]
    if not redis.call('ZSCORE', KEYS[3], digest) and redis.call('ZCARD', KEYS[3]) >= max_users then
      -- A full table: idle users leave first; if all are active, share the overflow window.
      redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_min - 60)
      if redis.call('ZCARD', KEYS[3]) >= max_users then
        key, digest, overflow = KEYS[4], nil, 1
      end
    end
    if not windows[key] then
      windows[key] = {n = 0, digest = digest, grant = 0}
      order[#order + 1] = key
    end
    slot[i] = key
    windows[key].n = windows[key].n + count
  end
  for _, key in ipairs(order) do
    local fields = redis.call('HGETALL', key)
    local total, oldest = 0, nil
    for j = 1, #fields, 2 do
      local m = tonumber(fields[j])
      if m <= now_min - 60 then
        redis.call('HDEL', key, fields[j])
      else
        total = total + tonumber(fields[j + 1])
        if not oldest or m < oldest then oldest = m end
      end
    end
    if total + windows[key].n > per_hour then
      local leaves = ((oldest or now_min) + 60) * 60000000
      return {3, math.max(1000, math.ceil((leaves - now_us) / 1000))}
    end
    -- Credit for a user's own window only: the overflow window is shared by strangers.
    if want_user > 0 and windows[key].digest then
      local grant = credit(want_user, per_hour - total - windows[key].n, 1)
      windows[key].grant = grant
      windows[key].n = windows[key].n + grant
    end
  end
end

if new_tat then redis.call('HSET', KEYS[1], 'tat', fmt(new_tat)) end
if new_lvl then
  redis.call('HSET', KEYS[1], 'lvl', string.format('%.3f', new_lvl), 'at', fmt(now_us))
  lvl = new_lvl
end
if new_tat or new_lvl then keep_rate(KEYS[1], tpm, lvl) end
for _, key in ipairs(order) do
  if windows[key].n > 0 then redis.call('HINCRBY', key, now_min, windows[key].n) end
  redis.call('EXPIRE', key, 3660)
  if windows[key].digest then redis.call('ZADD', KEYS[3], now_min, windows[key].digest) end
end
if #order > 0 then redis.call('EXPIRE', KEYS[3], 3660) end
local reply = {0, dv, mv, overflow, grant_req, grant_tok, now_min}
for i = 1, #KEYS - 4 do
  local key = slot[i]
  reply[#reply + 1] = (key and windows[key].grant) or 0
end
return reply
