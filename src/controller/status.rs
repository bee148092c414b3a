//! From what a reconcile observed to the policy's status and conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use super::admission::Refusal;
use super::gateway::GatewayState;
pub use super::observe::Waiting;
use crate::api::{
    FingerprintKey, McpSessionPolicyStatus, PodSessions, PodTotals, RolloutStatus, SessionTotals,
    condition,
};
use crate::events::Transition;
use crate::store::SessionCounts;
use crate::store::redis::RetentionVerdict;

/// Why a policy's sessions could not be counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    InvalidPolicy(String),
    SecretNotFound(String),
    SecretKeyNotFound(String),
    RedisUnreachable(String),
    RedisError(String),
}

impl Problem {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidPolicy(_) => "InvalidPolicy",
            Self::SecretNotFound(_) => "SecretNotFound",
            Self::SecretKeyNotFound(_) => "SecretKeyNotFound",
            Self::RedisUnreachable(_) => "RedisUnreachable",
            Self::RedisError(_) => "RedisError",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::InvalidPolicy(m)
            | Self::SecretNotFound(m)
            | Self::SecretKeyNotFound(m)
            | Self::RedisUnreachable(m)
            | Self::RedisError(m) => m,
        }
    }

    /// Worth retrying with backoff (as opposed to waiting for the spec to change).
    pub fn is_transient(&self) -> bool {
        !matches!(self, Self::InvalidPolicy(_))
    }
}

/// A condition's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    True,
    False,
    Unknown,
}

impl Status {
    /// A condition's status as written; anything but `True` or `False` is `Unknown`.
    pub fn of(condition: &Condition) -> Self {
        match condition.status.as_str() {
            "True" => Self::True,
            "False" => Self::False,
            _ => Self::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

/// What one condition says: its status, why (a reason in CamelCase), and in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assessment {
    pub status: Status,
    pub reason: &'static str,
    pub message: String,
}

impl Assessment {
    fn new(status: Status, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason,
            message: message.into(),
        }
    }
}

/// What one reconcile saw.
pub struct Observation {
    pub generation: Option<i64>,
    pub counts: Result<SessionCounts, Problem>,
    /// Sessions of every selected pod, zero included, sorted by pod name.
    pub pod_sessions: Vec<(String, u64)>,
    pub pods: PodTotals,
    /// Records under the prefix that do not parse (scan counts only).
    pub unreadable: u64,
    /// How Services reach the selected pods.
    pub routing: Routing,
    /// The last rollout of the selected pods, as tracked now.
    pub last_rollout: Option<RolloutStatus>,
    /// Sessions that terminating pods still serve, until they end (drain strategy `Wait`).
    pub waiting: Waiting,
    /// `rollout.maxLostSessions` of the policy.
    pub max_lost_sessions: u64,
    /// Whether Redis keeps session records (`None`: not known, e.g. unreachable, or `INFO`
    /// refused).
    pub retention: Option<RetentionVerdict>,
    pub fingerprint_key: KeyState,
    pub gateway: GatewayState,
    /// ReplicaSets of the selected pods whose pods the apiserver refuses.
    pub refused_pods: Vec<Refusal>,
}

/// The `PodsAdmitted` condition.
fn pods_admitted(refused: &[Refusal]) -> Assessment {
    if refused.is_empty() {
        return Assessment::new(
            Status::True,
            "Admitted",
            "No ReplicaSet of the selected pods is refused its pods".to_owned(),
        );
    }
    let each: Vec<String> = refused
        .iter()
        .map(|r| format!("ReplicaSet {}: {}", r.replica_set, r.reason))
        .collect();
    if refused.iter().any(Refusal::by_pod_security) {
        Assessment::new(
            Status::False,
            "PodSecurityRefused",
            format!(
                "the namespace's Pod Security level refuses the backend's own spec (the injected proxy meets `restricted`): {}",
                each.join("; ")
            ),
        )
    } else {
        Assessment::new(Status::False, "PodsRefused", each.join("; "))
    }
}

/// The `GatewayReady` condition.
fn gateway_ready(state: &GatewayState) -> Assessment {
    match state {
        GatewayState::Disabled => Assessment::new(
            Status::True,
            "Disabled",
            "No gateway runs for this policy".to_owned(),
        ),
        GatewayState::Running { ready, replicas } if *ready > 0 => Assessment::new(
            Status::True,
            "Available",
            format!("{ready} of {replicas} gateway pods ready"),
        ),
        GatewayState::Running { replicas, .. } => Assessment::new(
            Status::False,
            "Unavailable",
            format!("none of {replicas} gateway pods is ready"),
        ),
        GatewayState::Failed(message) => {
            Assessment::new(Status::False, "WriteFailed", message.clone())
        }
    }
}

/// The Secret with the proxies' fingerprint key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyState {
    /// No proxy is injected: no key is needed.
    NotNeeded,
    Ready(FingerprintKey),
    Missing {
        reason: &'static str,
        message: String,
    },
}

/// The `FingerprintKeyReady` condition.
fn fingerprint_key_ready(state: &KeyState) -> Assessment {
    match state {
        KeyState::NotNeeded => Assessment::new(
            Status::True,
            "InjectionDisabled",
            "No proxy is injected: no key is needed".to_owned(),
        ),
        KeyState::Ready(FingerprintKey::Named(secret)) => Assessment::new(
            Status::True,
            "Named",
            format!(
                "Proxies fingerprint credentials with key {:?} of Secret {}",
                secret.key, secret.name
            ),
        ),
        KeyState::Ready(FingerprintKey::Generated(secret)) => Assessment::new(
            Status::True,
            "Generated",
            format!(
                "Proxies fingerprint credentials with the key generated for this policy (Secret {})",
                secret.name
            ),
        ),
        KeyState::Missing { reason, message } => {
            Assessment::new(Status::False, reason, message.clone())
        }
    }
}

/// Whether traffic reaches the injected proxies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    InjectionDisabled,
    /// Services that select the pods, all targeting the proxy (or none).
    ThroughProxy(usize),
    /// Descriptions of Services that target the backend's port directly.
    Bypassed(Vec<String>),
}

/// The `SessionsRetained` condition: proxies serve sessions Redis lacks from memory, but one
/// that restarts then loses them, so an evicting or full Redis is worth an operator's look.
fn sessions_retained(verdict: Option<&RetentionVerdict>) -> Assessment {
    match verdict {
        None => Assessment::new(
            Status::Unknown,
            "NotChecked",
            "Redis's eviction policy and memory could not be read".to_owned(),
        ),
        Some(verdict @ RetentionVerdict::Retained) => Assessment::new(
            Status::True,
            verdict.reason(),
            "Redis neither evicts session records nor refuses writes".to_owned(),
        ),
        Some(verdict @ RetentionVerdict::EvictionPolicy(policy)) => Assessment::new(
            Status::False,
            verdict.reason(),
            format!(
                "maxmemory-policy {policy} evicts session records under memory pressure; proxies serve evicted sessions from memory, but lose them when they restart: use volatile-lru or noeviction with headroom"
            ),
        ),
        Some(verdict @ RetentionVerdict::WritesRefused { used, max }) => Assessment::new(
            Status::False,
            verdict.reason(),
            format!(
                "Redis is full ({used} of maxmemory {max} bytes, noeviction) and refuses writes: new sessions live only in their proxy's memory"
            ),
        ),
        Some(verdict @ RetentionVerdict::KeysEvicted { policy, evicted }) => Assessment::new(
            Status::False,
            verdict.reason(),
            format!(
                "Redis evicted {evicted} keys with a TTL ({policy}); session records have one: give it more memory"
            ),
        ),
    }
}

/// The status for `observation`, keeping `lastTransitionTime` of conditions whose status did
/// not change, so that an unchanged world gives an identical status (and no write).
pub fn build(
    previous: Option<&McpSessionPolicyStatus>,
    observation: &Observation,
) -> McpSessionPolicyStatus {
    let (ready, redis) = match &observation.counts {
        Ok(counts) => {
            let message = match observation.unreadable {
                0 => format!("{} sessions, {} draining", counts.total, counts.draining),
                n => format!(
                    "{} sessions, {} draining; {n} unreadable records skipped",
                    counts.total, counts.draining
                ),
            };
            (
                Assessment::new(Status::True, "SessionsCounted", message),
                Assessment::new(Status::True, "Connected", "Redis answers".to_owned()),
            )
        }
        Err(problem) => {
            let redis = match problem {
                Problem::RedisUnreachable(m) => {
                    Assessment::new(Status::False, "Unreachable", m.clone())
                }
                Problem::RedisError(m) => Assessment::new(Status::False, "RedisError", m.clone()),
                _ => Assessment::new(
                    Status::Unknown,
                    "NotChecked",
                    "Redis is not contacted until the policy's target resolves".to_owned(),
                ),
            };
            (
                Assessment::new(
                    Status::False,
                    problem.reason(),
                    problem.message().to_owned(),
                ),
                redis,
            )
        }
    };
    let rollout = rollout_safe(
        observation.last_rollout.as_ref(),
        observation.max_lost_sessions,
        &observation.waiting,
    );
    let routed = match &observation.routing {
        Routing::InjectionDisabled => Assessment::new(
            Status::True,
            "InjectionDisabled",
            "No proxy is injected; Services are not checked".to_owned(),
        ),
        Routing::ThroughProxy(0) => Assessment::new(
            Status::True,
            "NoService",
            "No Service selects the pods".to_owned(),
        ),
        Routing::ThroughProxy(n) => Assessment::new(
            Status::True,
            "ThroughProxy",
            format!("{n} Services route to the session proxy"),
        ),
        Routing::Bypassed(services) => {
            Assessment::new(Status::False, "ServiceBypassesProxy", services.join("; "))
        }
    };
    let conditions = [
        (condition::READY, ready),
        (condition::REDIS_REACHABLE, redis),
        (condition::ROLLOUT_SAFE, rollout),
        (condition::SERVICES_ROUTED, routed),
        (
            condition::SESSIONS_RETAINED,
            sessions_retained(observation.retention.as_ref()),
        ),
        (
            condition::FINGERPRINT_KEY_READY,
            fingerprint_key_ready(&observation.fingerprint_key),
        ),
        (
            condition::GATEWAY_READY,
            gateway_ready(&observation.gateway),
        ),
        (
            condition::PODS_ADMITTED,
            pods_admitted(&observation.refused_pods),
        ),
    ]
    .into_iter()
    .map(|(type_, assessment)| condition(previous, observation.generation, type_, assessment))
    .collect();
    let counts = observation.counts.as_ref().ok();
    let previous_sessions = previous.map(|p| p.sessions.clone()).unwrap_or_default();
    McpSessionPolicyStatus {
        observed_generation: observation.generation,
        conditions,
        // Keep the last known counts while they cannot be read, rather than report zero.
        sessions: counts.map_or(previous_sessions, |c| SessionTotals {
            total: c.total,
            active: c.active,
            draining: c.draining,
            waiting: observation.waiting.sessions,
        }),
        pod_sessions: match counts {
            Some(_) => observation
                .pod_sessions
                .iter()
                .map(|(pod, sessions)| PodSessions {
                    pod: pod.clone(),
                    sessions: *sessions,
                })
                .collect(),
            None => previous.map(|p| p.pod_sessions.clone()).unwrap_or_default(),
        },
        pods: observation.pods.clone(),
        last_rollout: observation.last_rollout.clone(),
    }
}

/// The RolloutSafe reason while the old pods of a rollout serve their sessions until they end.
const WAITING_FOR_SESSIONS: &str = "WaitingForSessions";

/// The RolloutSafe condition for the last rollout; `waiting`: what its old pods still serve.
fn rollout_safe(rollout: Option<&RolloutStatus>, max_lost: u64, waiting: &Waiting) -> Assessment {
    let Some(rollout) = rollout else {
        return Assessment::new(
            Status::True,
            "NoRolloutInProgress",
            "No rollout of the selected pods is in progress".to_owned(),
        );
    };
    let counts = format!(
        "rollout to revision {}: {} sessions drained, {} rehydrated, {} lost",
        rollout.revision, rollout.drained, rollout.rehydrated, rollout.lost
    );
    if rollout.lost > max_lost {
        let action = match &rollout.paused {
            Some(paused) => format!(
                "paused: {paused}; find why the new pods refuse the sessions, then raise rollout.maxLostSessions or `kubectl rollout resume` to go on"
            ),
            None => "not paused".to_owned(),
        };
        return Assessment::new(
            Status::False,
            "TooManyLostSessions",
            format!("{counts} (at most {max_lost} allowed); {action}"),
        );
    }
    match rollout.finished_at {
        Some(_) => Assessment::new(Status::True, "RolloutFinished", counts),
        None if waiting.sessions > 0 => Assessment::new(
            Status::True,
            WAITING_FOR_SESSIONS,
            format!(
                "{counts}; {} sessions still served by {} old pods, which stop once those end (drain strategy Wait): {}",
                waiting.sessions,
                waiting.pods.len(),
                waiting.pods.join(", ")
            ),
        ),
        None => Assessment::new(Status::True, "RolloutInProgress", counts),
    }
}

fn condition(
    previous: Option<&McpSessionPolicyStatus>,
    generation: Option<i64>,
    type_: &str,
    assessment: Assessment,
) -> Condition {
    let status = assessment.status.as_str();
    let before = previous.and_then(|p| find(&p.conditions, type_));
    let last_transition_time = match before {
        Some(before) if before.status == status => before.last_transition_time.clone(),
        _ => Time(Timestamp::now()),
    };
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: assessment.reason.to_owned(),
        message: assessment.message,
        observed_generation: generation,
        last_transition_time,
    }
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// The Events worth emitting for the conditions that changed.
pub fn transitions(
    previous: Option<&McpSessionPolicyStatus>,
    next: &McpSessionPolicyStatus,
) -> Vec<Transition> {
    let mut events = Vec::new();
    let before = |type_| previous.and_then(|p| find(&p.conditions, type_));
    let after = |type_| find(&next.conditions, type_);
    if let (Some(old), Some(new)) = (
        before(condition::REDIS_REACHABLE),
        after(condition::REDIS_REACHABLE),
    ) && Status::of(old) == Status::False
        && Status::of(new) == Status::True
    {
        events.push(Transition::normal("RedisReachable", "Redis answers again"));
    }
    for type_ in [
        condition::READY,
        condition::SERVICES_ROUTED,
        condition::ROLLOUT_SAFE,
        condition::FINGERPRINT_KEY_READY,
        condition::PODS_ADMITTED,
    ] {
        if let Some(new) = after(type_)
            && Status::of(new) == Status::False
            && before(type_)
                .is_none_or(|old| old.reason != new.reason || old.message != new.message)
        {
            events.push(Transition::warning(&new.reason, &new.message));
        }
    }
    // A rollout that waits for its old pods' sessions is news once, not at every count.
    if let Some(new) = after(condition::ROLLOUT_SAFE)
        && new.reason == WAITING_FOR_SESSIONS
        && before(condition::ROLLOUT_SAFE).is_none_or(|old| old.reason != new.reason)
    {
        events.push(Transition::normal(WAITING_FOR_SESSIONS, &new.message));
    }
    // A gateway starting is unavailable for a while: only one that cannot be written is news.
    if let Some(new) = after(condition::GATEWAY_READY)
        && new.reason == "WriteFailed"
        && before(condition::GATEWAY_READY).is_none_or(|old| old.message != new.message)
    {
        events.push(Transition::warning("GatewayWriteFailed", &new.message));
    }
    // Its message counts evictions, which grow: a new reason is news, a new count is not.
    if let Some(new) = after(condition::SESSIONS_RETAINED)
        && Status::of(new) == Status::False
        && before(condition::SESSIONS_RETAINED).is_none_or(|old| old.reason != new.reason)
    {
        events.push(Transition::warning(&new.reason, &new.message));
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SecretKeyRef;

    fn observation(counts: Result<SessionCounts, Problem>) -> Observation {
        Observation {
            gateway: GatewayState::Disabled,
            refused_pods: Vec::new(),
            generation: Some(2),
            counts,
            pod_sessions: vec![("web-0".into(), 3)],
            pods: PodTotals {
                selected: 1,
                ready: 1,
                terminating: 0,
            },
            unreadable: 0,
            routing: Routing::ThroughProxy(1),
            last_rollout: None,
            waiting: Waiting::default(),
            max_lost_sessions: 0,
            retention: Some(RetentionVerdict::Retained),
            fingerprint_key: KeyState::Ready(FingerprintKey::Generated(SecretKeyRef {
                name: "web-fingerprint-key".into(),
                key: "key".into(),
            })),
        }
    }

    #[test]
    fn a_rollout_waiting_for_its_old_pods_sessions_says_so_once() {
        let rolling = || RolloutStatus {
            revision: "v2".into(),
            started_at: Some("t1".into()),
            ..Default::default()
        };
        let waiting = |sessions| Observation {
            last_rollout: Some(rolling()),
            waiting: Waiting {
                sessions,
                pods: vec!["web-old-a".into(), "web-old-b".into()],
            },
            ..observation(Ok(SessionCounts::default()))
        };
        let started = build(None, &waiting(0));
        let safe = find(&started.conditions, "RolloutSafe").unwrap();
        assert_eq!(safe.reason, "RolloutInProgress");
        let first = build(Some(&started), &waiting(12));
        assert_eq!(first.sessions.waiting, 12);
        let safe = find(&first.conditions, "RolloutSafe").unwrap();
        assert_eq!(
            (safe.status.as_str(), safe.reason.as_str()),
            ("True", WAITING_FOR_SESSIONS)
        );
        assert!(
            safe.message.ends_with("12 sessions still served by 2 old pods, which stop once those end (drain strategy Wait): web-old-a, web-old-b"),
            "{}",
            safe.message
        );
        let events = transitions(Some(&started), &first);
        assert_eq!(events.len(), 1, "{events:?}");
        assert!(!events[0].is_warning());
        let fewer = build(Some(&first), &waiting(3));
        assert!(
            transitions(Some(&first), &fewer).is_empty(),
            "a new count is no news"
        );
    }

    #[test]
    fn a_missing_fingerprint_key_is_a_condition_and_an_event_once() {
        let counts = || Ok(SessionCounts::default());
        let generated = build(None, &observation(counts()));
        let ready = find(&generated.conditions, "FingerprintKeyReady").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Generated")
        );
        let missing = Observation {
            fingerprint_key: KeyState::Missing {
                reason: "SecretNotFound",
                message: "Secret apps/keys does not exist".into(),
            },
            ..observation(counts())
        };
        let next = build(Some(&generated), &missing);
        let condition = find(&next.conditions, "FingerprintKeyReady").unwrap();
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "SecretNotFound")
        );
        assert!(
            transitions(Some(&generated), &next)
                .iter()
                .any(|t| t.is_warning()
                    && t.reason == "SecretNotFound"
                    && t.note.contains("apps/keys"))
        );
        let again = build(Some(&next), &missing);
        assert!(transitions(Some(&next), &again).is_empty(), "once");
        assert!(
            find(&again.conditions, "Ready").unwrap().status == "True",
            "sessions are still counted"
        );
    }

    #[test]
    fn an_evicting_or_full_redis_is_a_condition_and_one_event_per_reason() {
        let counts = || Ok(SessionCounts::default());
        let retained = build(None, &observation(counts()));
        let evicting = Observation {
            retention: Some(RetentionVerdict::EvictionPolicy("allkeys-lru".into())),
            ..observation(counts())
        };
        let next = build(Some(&retained), &evicting);
        let condition = find(&next.conditions, "SessionsRetained").unwrap();
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "EvictionPolicy")
        );
        assert!(condition.message.contains("allkeys-lru"));
        assert!(
            find(&next.conditions, "Ready").unwrap().status == "True",
            "still ready"
        );
        let events = transitions(Some(&retained), &next);
        assert!(
            events
                .iter()
                .any(|t| t.is_warning() && t.reason == "EvictionPolicy")
        );
        let evicted = |n| Observation {
            retention: Some(RetentionVerdict::KeysEvicted {
                policy: "volatile-lru".into(),
                evicted: n,
            }),
            ..observation(counts())
        };
        let first = build(Some(&next), &evicted(3));
        let more = build(Some(&first), &evicted(9));
        assert!(
            transitions(Some(&next), &first)
                .iter()
                .any(|t| t.reason == "KeysEvicted")
        );
        assert!(
            transitions(Some(&first), &more).is_empty(),
            "more evictions, same news"
        );
        let full = Observation {
            retention: Some(RetentionVerdict::WritesRefused { used: 10, max: 10 }),
            ..observation(counts())
        };
        assert_eq!(
            find(&build(None, &full).conditions, "SessionsRetained")
                .unwrap()
                .reason,
            "WritesRefused"
        );
        let unknown = Observation {
            retention: None,
            ..observation(counts())
        };
        assert_eq!(
            find(&build(None, &unknown).conditions, "SessionsRetained")
                .unwrap()
                .status,
            "Unknown"
        );
    }

    #[test]
    fn pods_refused_by_pod_security_are_a_condition_and_one_event() {
        let counts = || Ok(SessionCounts::default());
        let admitted = build(None, &observation(counts()));
        let condition = find(&admitted.conditions, "PodsAdmitted").unwrap();
        assert_eq!(condition.status, "True");
        let refused = Observation {
            refused_pods: vec![Refusal {
                replica_set: "web-7d9c".into(),
                reason: r#"violates PodSecurity "restricted:latest": runAsNonRoot != true (pod or container "server" must set securityContext.runAsNonRoot=true)"#.into(),
            }],
            ..observation(counts())
        };
        let next = build(Some(&admitted), &refused);
        let condition = find(&next.conditions, "PodsAdmitted").unwrap();
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "PodSecurityRefused")
        );
        assert!(
            condition
                .message
                .contains("ReplicaSet web-7d9c: violates PodSecurity")
        );
        assert!(
            transitions(Some(&admitted), &next)
                .iter()
                .any(|t| t.is_warning() && t.reason == "PodSecurityRefused")
        );
        let again = build(Some(&next), &refused);
        assert!(transitions(Some(&next), &again).is_empty(), "once");
        let quota = Observation {
            refused_pods: vec![Refusal {
                replica_set: "web-7d9c".into(),
                reason: "exceeded quota: pods".into(),
            }],
            ..observation(counts())
        };
        assert_eq!(
            find(&build(None, &quota).conditions, "PodsAdmitted")
                .unwrap()
                .reason,
            "PodsRefused"
        );
    }

    #[test]
    fn an_unchanged_world_gives_an_identical_status() {
        let counts = SessionCounts {
            total: 3,
            active: 3,
            ..Default::default()
        };
        let first = build(None, &observation(Ok(counts.clone())));
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second = build(Some(&first), &observation(Ok(counts)));
        assert_eq!(first, second);
        assert_eq!(
            find(&second.conditions, "Ready").unwrap().reason,
            "SessionsCounted"
        );
        assert!(transitions(Some(&first), &second).is_empty());
    }

    #[test]
    fn losing_and_regaining_redis_is_two_events_and_keeps_the_last_counts() {
        let counts = SessionCounts {
            total: 3,
            active: 3,
            ..Default::default()
        };
        let up = build(None, &observation(Ok(counts.clone())));
        let down = build(
            Some(&up),
            &observation(Err(Problem::RedisUnreachable(
                "cannot reach Redis at redis://r:6379".into(),
            ))),
        );
        assert_eq!(down.sessions.total, 3);
        assert_eq!(
            find(&down.conditions, "RedisReachable").unwrap().status,
            "False"
        );
        let lost = transitions(Some(&up), &down);
        assert_eq!(
            lost,
            vec![Transition::warning(
                "RedisUnreachable",
                "cannot reach Redis at redis://r:6379"
            )]
        );
        let still_down = build(
            Some(&down),
            &observation(Err(Problem::RedisUnreachable(
                "cannot reach Redis at redis://r:6379".into(),
            ))),
        );
        assert!(
            transitions(Some(&down), &still_down).is_empty(),
            "no event on every reconcile"
        );
        let back = build(Some(&still_down), &observation(Ok(counts)));
        assert_eq!(
            transitions(Some(&still_down), &back),
            vec![Transition::normal("RedisReachable", "Redis answers again")]
        );
    }
}
