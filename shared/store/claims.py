"""The send claim: the value under a send's "sent" key (keys.sent), shared by the gateway that
claims it (gateway.publisher) and the persister that records the stored copy's ack over it
(buffer.APPLY_BATCH). One of:

- `pending|<id>|<ts>`: a produce of that id and ts is in flight;
- `retry|<id>|<ts>`: the last produce failed: a resend takes the claim over and publishes the SAME
  id and ts (a failed produce may still have reached Kafka);
- the ack frame's JSON (it starts with '{'): Kafka has the message; a resend gets this ack.
"""

from __future__ import annotations

PENDING = b"pending|"
RETRY = b"retry|"


def is_ack(value: bytes) -> bool:
    return value.startswith(b"{")


# Prepended to every script that reads a claim: the Lua side of is_ack.
LUA = """
local function is_ack(v) return string.sub(v, 1, 1) == '{' end
"""

# KEYS[1] the sent key; ARGV: this send's "<id>|<ts>", the pending TTL (s). Returns the "<id>|<ts>"
# to publish (ours, or that of a failed earlier attempt: taken over), or nil when another attempt
# is in flight or acknowledged.
CLAIM = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'pending|' .. ARGV[1], 'EX', ARGV[2])
  return ARGV[1]
end
if string.sub(v, 1, 6) == 'retry|' then
  local taken = string.sub(v, 7)
  redis.call('SET', KEYS[1], 'pending|' .. taken, 'EX', ARGV[2])
  return taken
end
return false
"""
# Only over our own pending claim: once the persister has stored the message it records the first
# copy's ack in the same key, and that must survive. ARGV[1] is the claim ("pending|<id>|<ts>").
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
FAIL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'retry|' .. string.sub(ARGV[1], 9), 'EX', ARGV[2])
end
"""
RECORD_ACK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
"""
