//! Whether a Redis keeps the sessions written to it: its eviction policy and memory, as
//! `INFO memory` and `INFO stats` report them.

/// What `INFO` says of memory and evictions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    pub maxmemory_policy: String,
    /// Bytes; 0 means no limit.
    pub maxmemory: u64,
    pub used_memory: u64,
    /// Keys evicted since the server started.
    pub evicted_keys: u64,
}

/// Whether session records stay in Redis until their TTL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Retained,
    /// An `allkeys-*` policy evicts session records under memory pressure.
    EvictionPolicy(String),
    /// Full with `noeviction`: writes are refused.
    WritesRefused {
        used: u64,
        max: u64,
    },
    /// A `volatile-*` policy has evicted keys with a TTL, and session records have one.
    KeysEvicted {
        policy: String,
        evicted: u64,
    },
}

impl Verdict {
    /// Every verdict's name, as [`Verdict::reason`] gives them.
    pub const REASONS: [&str; 4] = ["Retained", "EvictionPolicy", "WritesRefused", "KeysEvicted"];

    /// The verdict's name: the reason of the policy's `SessionsRetained` condition, and the
    /// label of the proxy's `mcp_proxy_store_retention`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Retained => "Retained",
            Self::EvictionPolicy(_) => "EvictionPolicy",
            Self::WritesRefused { .. } => "WritesRefused",
            Self::KeysEvicted { .. } => "KeysEvicted",
        }
    }

    /// What the verdict means for sessions, for a proxy's log.
    pub fn consequence(&self) -> &'static str {
        match self {
            Self::Retained => "the store keeps sessions until their TTL",
            Self::WritesRefused { .. } => {
                "the store is full and refuses writes: sessions live in the proxy's memory until it takes them again"
            }
            Self::EvictionPolicy(_) | Self::KeysEvicted { .. } => {
                "the store evicts session records under memory pressure: the proxy writes back those it serves (use a volatile-* maxmemory-policy, and more memory)"
            }
        }
    }

    /// Whether Redis may have dropped session records before their TTL.
    pub fn may_evict(&self) -> bool {
        matches!(self, Self::EvictionPolicy(_) | Self::KeysEvicted { .. })
    }
}

impl Retention {
    /// Reads the fields of `INFO memory` and `INFO stats` output (`name:value` lines).
    pub fn parse(info: &str) -> Self {
        let mut retention = Self::default();
        for line in info.lines() {
            let Some((name, value)) = line.trim().split_once(':') else {
                continue;
            };
            let number = || value.trim().parse::<u64>().unwrap_or(0);
            match name {
                "maxmemory_policy" => retention.maxmemory_policy = value.trim().to_owned(),
                "maxmemory" => retention.maxmemory = number(),
                "used_memory" => retention.used_memory = number(),
                "evicted_keys" => retention.evicted_keys = number(),
                _ => {}
            }
        }
        retention
    }

    pub fn verdict(&self) -> Verdict {
        let policy = self.maxmemory_policy.as_str();
        if policy.starts_with("allkeys-") {
            return Verdict::EvictionPolicy(policy.to_owned());
        }
        if policy == "noeviction" && self.maxmemory > 0 && self.used_memory >= self.maxmemory {
            return Verdict::WritesRefused {
                used: self.used_memory,
                max: self.maxmemory,
            };
        }
        if policy.starts_with("volatile-") && self.evicted_keys > 0 {
            return Verdict::KeysEvicted {
                policy: policy.to_owned(),
                evicted: self.evicted_keys,
            };
        }
        Verdict::Retained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_evicts_or_refuses_sessions() {
        let info = |policy: &str, max: u64, used: u64, evicted: u64| {
            Retention::parse(&format!(
                "# Memory\r\nused_memory:{used}\r\nused_memory_human:1M\r\nmaxmemory:{max}\r\nmaxmemory_policy:{policy}\r\n# Stats\r\nevicted_keys:{evicted}\r\n"
            ))
        };
        assert_eq!(info("noeviction", 0, 10, 0).verdict(), Verdict::Retained);
        assert_eq!(
            info("volatile-lru", 100, 90, 0).verdict(),
            Verdict::Retained
        );
        assert_eq!(
            info("allkeys-lru", 0, 10, 0).verdict(),
            Verdict::EvictionPolicy("allkeys-lru".into())
        );
        assert_eq!(
            info("noeviction", 100, 100, 0).verdict(),
            Verdict::WritesRefused {
                used: 100,
                max: 100
            }
        );
        assert_eq!(
            info("volatile-ttl", 100, 90, 7).verdict(),
            Verdict::KeysEvicted {
                policy: "volatile-ttl".into(),
                evicted: 7
            }
        );
        assert_eq!(Retention::parse("garbage\nmaxmemory:x").maxmemory, 0);
    }
}
