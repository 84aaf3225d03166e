-- Settles one request (shared.rs). KEYS: 1 rate hash, 2 spend hash. ARGV: 1 tpm, 2 reserved
-- minus used tokens (negative when usage exceeded the reservation), 3 cost in nano-USD,
-- 4 day seconds. Returns {day spend, month spend}.
local tpm, delta, nanos, ds = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
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
