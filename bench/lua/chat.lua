-- POST one JSON body to the URL's path, rotating through API keys, and print a machine-readable summary.
--
--   wrk -t1 -c50 -d10s -s bench/lua/chat.lua http://127.0.0.1:PORT/v1/chat/completions -- KEYS_FILE BODY_FILE \
--       ["Header-Name: value" ...]
--
-- Arguments after BODY_FILE are extra request headers (a gateway routed per request, such as Portkey,
-- needs them on every call). KEYS_FILE holds one API key per line; each thread starts at its own offset, so with 10,000 keys
-- consecutive requests use different keys. The request bytes are built once in init(), so the
-- per-request cost in the load generator is a table lookup.

local thread_count = 0
local requests = {}
local index = 0

function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

local function read_lines(path)
  local lines = {}
  for line in io.lines(path) do
    if #line > 0 then
      lines[#lines + 1] = line
    end
  end
  return lines
end

local function read_all(path)
  local file = assert(io.open(path, "rb"))
  local data = file:read("*a")
  file:close()
  return data
end

function init(args)
  local keys = read_lines(args[1])
  local body = read_all(args[2])
  local extra = {}
  for i = 3, #args do
    local name, value = string.match(args[i], "^([^:]+):%s*(.*)$")
    assert(name, "a header argument must read 'Name: value': " .. args[i])
    extra[name] = value
  end
  for i, key in ipairs(keys) do
    local headers = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. key }
    for name, value in pairs(extra) do
      headers[name] = value
    end
    requests[i] = wrk.format("POST", nil, headers, body)
  end
  local offset = (thread_index or 0) * 7919
  index = offset % #requests
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    "BENCH_WRK {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"connect\":%d,\"read\":%d," ..
    "\"write\":%d,\"status\":%d,\"timeout\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d," ..
    "\"mean_us\":%.1f,\"max_us\":%d}\n",
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.mean, latency.max))
end
