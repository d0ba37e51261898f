-- Retire consumers of the job group that hold no pending job.
-- Redis makes a consumer on a worker's first XREADGROUP (the worker's id is its name) and
-- never drops it, so a deployment that restarts or scales its workers would grow the group
-- without bound, and XINFO CONSUMERS with it. The check and the delete run in one script:
-- XGROUP DELCONSUMER drops the consumer's pending entries too, and a job dropped that way
-- would never be claimed again, so a consumer still holding one is kept (another worker's
-- XAUTOCLAIM moves the job away, and a later sweep retires the consumer).
-- Retiring a consumer whose worker is alive after all costs nothing: its next read or claim
-- makes it again.
--
-- KEYS: jobs
-- ARGV: group *names
-- KEYS[1] the jobs stream
-- ARGV[1] the consumer group, ARGV[2..] consumer names
-- Returns the names retired.
local retired = {}
for i = 2, #ARGV do
  local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[i])
  if #held == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[i])
    retired[#retired + 1] = ARGV[i]
  end
end
return retired
