//! Who may open a new session in this proxy: the limits on sessions per identity and per proxy,
//! and on the rate at which identities new to the proxy arrive. Memory is bounded per session
//! (the event log, the `initialize` params); these bound the sessions, so that a client that
//! varies its Authorization value cannot fill the proxy. Pure bookkeeping, behind the session
//! table's lock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::api::contract::admission;

/// The admission limits of a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Sessions one identity (as the binding sees it) may hold.
    pub per_credential: usize,
    /// Sessions the proxy may hold in all.
    pub sessions: usize,
    /// Identities that hold no session here yet, admitted per minute; `None`: any number. They
    /// come in bursts of up to a tenth of it.
    pub new_identities_per_minute: Option<u32>,
}

impl AdmissionLimits {
    pub const DEFAULT: Self = Self {
        per_credential: admission::SESSIONS_PER_CREDENTIAL,
        sessions: admission::SESSIONS_PER_PROXY,
        new_identities_per_minute: Some(admission::NEW_IDENTITIES_PER_MINUTE),
    };
}

/// Why a new session was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The identity holds its limit.
    Credential { held: usize },
    /// The proxy holds its limit.
    Proxy { held: usize },
    /// Identities new to this proxy arrive faster than the limit.
    NewIdentities { retry_after: Duration },
}

impl Refusal {
    /// What `Retry-After` says: a session ends by DELETE or by its idle TTL, so a full proxy
    /// or identity is asked to wait a minute; a rate, until its next admission.
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::Credential { .. } | Self::Proxy { .. } => Duration::from_secs(60),
            Self::NewIdentities { retry_after } => *retry_after,
        }
    }
}

/// How many sessions each identity holds (admitted slots included), and in all.
#[derive(Debug, Default)]
pub struct Holdings {
    per_credential: HashMap<Option<Box<str>>, usize>,
    total: usize,
}

impl Holdings {
    pub fn held(&self, credential: &Option<Box<str>>) -> usize {
        self.per_credential.get(credential).copied().unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// One session more for `credential`.
    pub fn hold(&mut self, credential: Option<Box<str>>) {
        *self.per_credential.entry(credential).or_default() += 1;
        self.total += 1;
    }

    /// One session fewer for `credential`.
    pub fn release(&mut self, credential: &Option<Box<str>>) {
        if let Some(count) = self.per_credential.get_mut(credential) {
            *count -= 1;
            self.total -= 1;
            if *count == 0 {
                self.per_credential.remove(credential);
            }
        }
    }
}

/// Admits new sessions under [`AdmissionLimits`].
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    new_identities: Option<TokenBucket>,
}

impl Admission {
    pub fn new(limits: AdmissionLimits, now: Instant) -> Self {
        Self {
            limits,
            new_identities: limits
                .new_identities_per_minute
                .map(|per_minute| TokenBucket::per_minute(per_minute, now)),
        }
    }

    /// Takes a place for a new session of `credential` in `holdings`, or says why not. The
    /// identity's and the proxy's limits come first, so that a refused session never spends
    /// an admission of the rate.
    pub fn admit(
        &mut self,
        holdings: &mut Holdings,
        credential: &Option<Box<str>>,
        now: Instant,
    ) -> Result<(), Refusal> {
        let held = holdings.held(credential);
        if held >= self.limits.per_credential {
            return Err(Refusal::Credential { held });
        }
        if holdings.total() >= self.limits.sessions {
            return Err(Refusal::Proxy {
                held: holdings.total(),
            });
        }
        if held == 0
            && let Some(bucket) = &mut self.new_identities
        {
            bucket
                .take(now)
                .map_err(|retry_after| Refusal::NewIdentities { retry_after })?;
        }
        holdings.hold(credential.clone());
        Ok(())
    }
}

/// A token bucket: `rate` tokens a second, at most `capacity` saved up.
#[derive(Debug)]
struct TokenBucket {
    capacity: f64,
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// `per_minute` a minute, in bursts of up to a tenth of it (at least one).
    fn per_minute(per_minute: u32, now: Instant) -> Self {
        let capacity = (f64::from(per_minute) / 10.0).max(1.0);
        Self {
            capacity,
            rate: f64::from(per_minute) / 60.0,
            tokens: capacity,
            at: now,
        }
    }

    /// One token, or how long until there is one.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = if self.rate > 0.0 {
            (1.0 - self.tokens) / self.rate
        } else {
            f64::from(u32::MAX)
        };
        Err(Duration::from_secs_f64(wait.ceil().max(1.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Option<Box<str>> {
        Some(name.into())
    }

    fn admission(limits: AdmissionLimits, now: Instant) -> (Admission, Holdings) {
        (Admission::new(limits, now), Holdings::default())
    }

    #[test]
    fn a_flood_of_new_identities_is_held_to_the_rate_and_one_identity_to_its_limit() {
        let start = Instant::now();
        let limits = AdmissionLimits {
            per_credential: 3,
            sessions: 1_000,
            new_identities_per_minute: Some(600),
        };
        let (mut admission, mut holdings) = admission(limits, start);
        // 1,000 identities at once: a burst of a tenth of a minute's, then 10 a second.
        let admitted = (0..1_000)
            .filter(|i| {
                admission
                    .admit(&mut holdings, &key(&format!("c{i}")), start)
                    .is_ok()
            })
            .count();
        assert_eq!(admitted, 60);
        assert_eq!(
            admission.admit(&mut holdings, &key("late"), start),
            Err(Refusal::NewIdentities {
                retry_after: Duration::from_secs(1)
            })
        );
        let later = start + Duration::from_secs(2);
        let admitted = (0..100)
            .filter(|i| {
                admission
                    .admit(&mut holdings, &key(&format!("d{i}")), later)
                    .is_ok()
            })
            .count();
        assert_eq!(admitted, 20, "10 a second");
        // An identity that holds a session is not new: its next ones pass the rate, up to its
        // own limit.
        assert_eq!(admission.admit(&mut holdings, &key("c0"), later), Ok(()));
        assert_eq!(admission.admit(&mut holdings, &key("c0"), later), Ok(()));
        assert_eq!(
            admission.admit(&mut holdings, &key("c0"), later),
            Err(Refusal::Credential { held: 3 })
        );
        assert_eq!(holdings.total(), 82);
    }

    #[test]
    fn a_full_proxy_refuses_before_spending_the_rate_and_frees_with_releases() {
        let start = Instant::now();
        let limits = AdmissionLimits {
            per_credential: 10,
            sessions: 2,
            // Bursts of 3, one every 2 s.
            new_identities_per_minute: Some(30),
        };
        let (mut admission, mut holdings) = admission(limits, start);
        assert_eq!(admission.admit(&mut holdings, &key("a"), start), Ok(()));
        assert_eq!(admission.admit(&mut holdings, &None, start), Ok(()));
        assert_eq!(
            admission.admit(&mut holdings, &key("c"), start),
            Err(Refusal::Proxy { held: 2 })
        );
        holdings.release(&key("a"));
        holdings.release(&None);
        holdings.release(&key("nobody"));
        assert_eq!(
            holdings.total(),
            0,
            "releasing what is not held changes nothing"
        );
        assert_eq!(
            admission.admit(&mut holdings, &key("d"), start),
            Ok(()),
            "the admission the full proxy did not spend"
        );
        assert_eq!(
            admission.admit(&mut holdings, &key("e"), start),
            Err(Refusal::NewIdentities {
                retry_after: Duration::from_secs(2)
            })
        );
        assert_eq!(
            Refusal::Proxy { held: 2 }.retry_after(),
            Duration::from_secs(60)
        );
    }

    #[test]
    fn without_a_rate_any_number_of_identities_is_admitted_up_to_the_cap() {
        let start = Instant::now();
        let limits = AdmissionLimits {
            new_identities_per_minute: None,
            ..AdmissionLimits::DEFAULT
        };
        let (mut admission, mut holdings) = admission(limits, start);
        let admitted = (0..25_000)
            .filter(|i| {
                admission
                    .admit(&mut holdings, &key(&format!("c{i}")), start)
                    .is_ok()
            })
            .count();
        assert_eq!(admitted, AdmissionLimits::DEFAULT.sessions);
    }
}
