//! Lua scripts. Each touches the keys of one hash slot only, so they run on Redis Cluster too.

use redis::{Cmd, Script};

/// A script sent as `EVALSHA`, falling back to `EVAL` when Redis has not cached it (a restarted
/// or failed-over server).
pub struct Lua {
    script: Script,
    body: &'static str,
}

impl Lua {
    fn new(body: &'static str) -> Self {
        Self {
            script: Script::new(body),
            body,
        }
    }

    pub fn cmd(&self, by_body: bool, keys: &[&str], args: &[&str]) -> Cmd {
        let mut cmd = if by_body {
            let mut c = redis::cmd("EVAL");
            c.arg(self.body);
            c
        } else {
            let mut c = redis::cmd("EVALSHA");
            c.arg(self.script.get_hash());
            c
        };
        cmd.arg(keys.len()).arg(keys).arg(args);
        cmd
    }
}

pub struct Scripts {
    pub touch: Lua,
    pub compare_and_set: Lua,
    pub prune_pod: Lua,
    pub expire_draining: Lua,
    pub append_events: Lua,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            touch: Lua::new(TOUCH),
            compare_and_set: Lua::new(COMPARE_AND_SET),
            prune_pod: Lua::new(PRUNE_POD),
            expire_draining: Lua::new(EXPIRE_DRAINING),
            append_events: Lua::new(APPEND_EVENTS),
        }
    }
}

/// Slides a record's TTL and rewrites its top-level `last_activity_at` in place, in one round
/// trip and without re-encoding the JSON (cjson would reorder keys, turn `[]` into `{}` and
/// round large numbers). The first occurrence is the top-level field because writers put it
/// before any nested object (the seed's `json.dumps` and this crate alike), and inside a JSON
/// string every quote is escaped, so the pattern cannot match there.
/// KEYS[1] record; ARGV[1] TTL in ms; ARGV[2] the new timestamp. Returns 0 if gone, 2 if the
/// record says draining, else 1. (`"state":"draining"` as a pair can only be a key and its
/// value, at worst of a nested object: then the caller's claim, which parses, finds out.)
const TOUCH: &str = r#"
local value = redis.call('GET', KEYS[1])
if not value then return 0 end
local draining = string.find(value, '"state":"draining"', 1, true) ~= nil
local updated, n = string.gsub(value, '"last_activity_at"%s*:%s*"[^"]*"',
  '"last_activity_at":"' .. ARGV[2] .. '"', 1)
if n == 1 then
  redis.call('SET', KEYS[1], updated, 'PX', ARGV[1])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
if draining then return 2 end
return 1
"#;

/// Replaces a record only if it still holds what the caller read: the base of every
/// read-modify-write (claims, drains, updates), so exactly one of racing writers wins.
/// KEYS[1] record; ARGV[1] expected value; ARGV[2] new value; ARGV[3] TTL in ms or 'keep'.
const COMPARE_AND_SET: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == 'keep' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"#;

/// Drops a pod's expired index entries and, if none are left, the pod itself, atomically so a
/// session indexed meanwhile is not lost. KEYS[1] pods set; KEYS[2] the pod's set (same slot);
/// ARGV[1] pod name; ARGV[2] now in ms. Returns {expired entries, 1 if the pod was dropped}.
const PRUNE_POD: &str = r#"
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[2])
if redis.call('ZCARD', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return {expired, 1}
end
return {expired, 0}
"#;

/// Counts draining sessions that expired unclaimed as lost: removes their entries from the
/// draining index and adds as many to the `lost` tally in one step, so racing callers (two
/// operator replicas, `sessions prune`) count each session once. The sentinel scores +inf and
/// stays. KEYS[1] draining set; KEYS[2] tallies (same slot); ARGV[1] now in ms. Returns the count.
const EXPIRE_DRAINING: &str = r#"
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1])
if expired > 0 then
  redis.call('HINCRBY', KEYS[2], 'lost', expired)
end
return expired
"#;

/// Appends to an event log and keeps its newest entries within a count and a byte bound
/// ([`crate::store::LogBound`]: the same rule; an entry over the byte bound is not appended),
/// sliding its TTL; a log left empty is deleted.
/// KEYS[1] log; ARGV[1] entries to keep; ARGV[2] bytes to keep; ARGV[3] TTL in ms; ARGV[4..]
/// the new entries, oldest first. Returns the entries kept.
const APPEND_EVENTS: &str = r#"
local budget = tonumber(ARGV[2])
for i = 4, #ARGV do
  if #ARGV[i] <= budget then redis.call('RPUSH', KEYS[1], ARGV[i]) end
end
local entries = redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)
local kept = 0
for i = #entries, 1, -1 do
  budget = budget - #entries[i]
  if budget < 0 then break end
  kept = kept + 1
end
if kept == 0 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('LTRIM', KEYS[1], -kept, -1)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return kept
"#;
