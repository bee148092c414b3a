//! Events on policies, as the controller and the webhook publish them: one reporter identity,
//! notes cut to the API's limit, a failure to publish logged and never fatal.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::Resource as _;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::warn;

use crate::api::McpSessionPolicy;

/// `note` is cut to this many characters (the API refuses longer ones).
const MAX_NOTE: usize = 1024;

/// What an Event on a policy says: Normal or Warning, why (a reason in CamelCase), in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub kind: EventType,
    pub reason: String,
    pub note: String,
}

impl Transition {
    pub fn warning(reason: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            kind: EventType::Warning,
            reason: reason.into(),
            note: note.into(),
        }
    }

    pub fn normal(reason: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            kind: EventType::Normal,
            reason: reason.into(),
            note: note.into(),
        }
    }

    pub fn is_warning(&self) -> bool {
        self.kind == EventType::Warning
    }
}

/// Publishes Events on policies as this replica.
#[derive(Clone)]
pub struct PolicyEvents {
    recorder: Recorder,
}

impl PolicyEvents {
    pub fn new(client: Client, identity: &str) -> Self {
        Self {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: crate::api::contract::FIELD_MANAGER.into(),
                    instance: Some(identity.to_owned()),
                },
            ),
        }
    }

    /// `transition` as an Event on `policy`, for `action`.
    pub async fn publish(&self, policy: &McpSessionPolicy, action: &str, transition: &Transition) {
        let event = Event {
            type_: transition.kind,
            reason: transition.reason.clone(),
            note: Some(transition.note.chars().take(MAX_NOTE).collect()),
            action: action.to_owned(),
            secondary: None,
        };
        let regarding: ObjectReference = policy.object_ref(&());
        if let Err(error) = self.recorder.publish(&event, &regarding).await {
            warn!(%error, reason = %transition.reason, "cannot publish an Event");
        }
    }
}
