-- Replays a file of requests (METHOD \t PATH \t TOKEN \t BODY per line), each thread taking
-- its own share, so every UpdateOrder names a fresh order at its current version.
local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  requests = {}
  local file, nthreads = args[1], tonumber(args[2])
  local n = 0
  for line in io.lines(file) do
    if n % nthreads == id then
      local method, path, token, body = line:match("([^\t]+)\t([^\t]+)\t([^\t]+)\t(.*)")
      table.insert(requests, wrk.format(method, path, {
        ["Authorization"] = "Bearer " .. token,
        ["Content-Type"] = "application/json"}, body))
    end
    n = n + 1
  end
  index = 0
  bad = 0
end

function request()
  index = index % #requests + 1
  return requests[index]
end

function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 end
end

function done(summary, latency, requests)
  local total_bad = 0
  for _, thread in ipairs(threads) do total_bad = total_bad + thread:get("bad") end
  io.write(string.format("NON200 %d\n", total_bad))
end
