-- Shared by admit.lua and settle.lua (prepended in shared.rs). Time is the Redis server's, so the
-- proxies' clocks never matter. Big numbers are written with %.0f: tostring keeps 14 digits only.
local function fmt(n) return string.format('%.0f', n) end

local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_s = tonumber(t[1])

-- Days since 1970-01-01 <-> civil dates (Howard Hinnant's algorithms), for calendar months.
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

-- The budget day and month of now (budget.rs's Periods::at, from Redis's clock).
local function periods(ds)
  local day_id = math.floor(now_s / ds)
  local day_end = (day_id + 1) * ds
  local month_id, month_end
  if ds == 86400 then
    local y, m = civil(day_id)
    month_id = y * 12 + (m - 1)
    local ny, nm = y, m + 1
    if nm > 12 then ny, nm = y + 1, 1 end
    month_end = days_from_civil(ny, nm, 1) * 86400
  else
    local len = ds * 30
    month_id = math.floor(now_s / len)
    month_end = (month_id + 1) * len
  end
  return day_id, day_end, month_id, month_end
end

-- Spend (nano-USD) of the current day and month; an older period's spend counts as nothing.
local function spent(key, day_id, month_id)
  local v = redis.call('HMGET', key, 'd', 'dv', 'm', 'mv')
  local dv, mv = 0, 0
  if v[1] and tonumber(v[1]) == day_id then dv = tonumber(v[2]) or 0 end
  if v[3] and tonumber(v[3]) == month_id then mv = tonumber(v[4]) or 0 end
  return dv, mv
end

-- The token bucket's level now (refilled since it was written), or nil when it is full.
local function level(key, tpm)
  local v = redis.call('HMGET', key, 'lvl', 'at')
  if not v[1] then return nil end
  local lvl = tonumber(v[1]) + (now_us - tonumber(v[2])) * tpm / 60000000
  if lvl > tpm then lvl = tpm end
  return lvl
end

-- Keeps the rate hash while its state differs from an absent one: a minute for the GCRA, and
-- until a token deficit has refilled.
local function keep_rate(key, tpm, lvl)
  local ttl = 120
  if lvl and tpm > 0 and lvl < tpm then ttl = ttl + math.ceil((tpm - lvl) / tpm * 60) end
  redis.call('EXPIRE', key, ttl)
end
