-- Settles answers and gives back unused credit (shared.rs). KEYS: 1 rate hash, 2 spend hash,
-- 3.. user windows. ARGV: 1 tpm, 2 tokens given back (reserved or leased minus used; negative
-- when usage exceeded the reservation), 3 cost in nano-USD, 4 day seconds, 5 rpm, 6 requests
-- given back, then (minute, units) per user window given back. Returns {day spend, month spend}.
local tpm, delta, nanos, ds = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local rpm, requests = tonumber(ARGV[5] or 0), tonumber(ARGV[6] or 0)
-- A request given back moves the GCRA's arrival time back, never before now: the window is
-- then as if it had not been leased, or fuller (never emptier).
if rpm > 0 and requests > 0 then
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or 0)
  if tat > now_us then
    tat = math.max(now_us, tat - requests * 60000000 / rpm)
    redis.call('HSET', KEYS[1], 'tat', fmt(tat))
  end
end
-- Units go back to the minute they were counted in, while it is still in the hour.
for i = 3, #KEYS do
  local minute, units = ARGV[2 * i + 1], tonumber(ARGV[2 * i + 2])
  local n = tonumber(redis.call('HGET', KEYS[i], minute) or 0)
  if n > 0 and units > 0 then
    if n > units then redis.call('HINCRBY', KEYS[i], minute, -units) else redis.call('HDEL', KEYS[i], minute) end
  end
end
if tpm > 0 and delta ~= 0 then
  local v = redis.call('HMGET', KEYS[1], 'lvl', 'at')
  if v[1] then
    -- Like the local bucket: the stored level moves; its refill time stays.
    local lvl = tonumber(v[1]) + delta
    redis.call('HSET', KEYS[1], 'lvl', string.format('%.3f', lvl))
    keep_rate(KEYS[1], tpm, level(KEYS[1], tpm))
  end
end
local day_id, _, month_id, month_end = periods(ds)
local dv, mv = spent(KEYS[2], day_id, month_id)
if nanos > 0 then
  dv, mv = dv + nanos, mv + nanos
  redis.call('HSET', KEYS[2], 'd', fmt(day_id), 'dv', fmt(dv), 'm', fmt(month_id), 'mv', fmt(mv))
  redis.call('EXPIREAT', KEYS[2], fmt(month_end + 3600))
end
return {dv, mv}
