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

    /// A Warning (`warning`) or Normal Event `reason` on `policy`, for `action`.
    pub async fn publish(
        &self,
        policy: &McpSessionPolicy,
        warning: bool,
        reason: &str,
        action: &str,
        note: &str,
    ) {
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.to_owned(),
            note: Some(note.chars().take(MAX_NOTE).collect()),
            action: action.to_owned(),
            secondary: None,
        };
        let regarding: ObjectReference = policy.object_ref(&());
        if let Err(error) = self.recorder.publish(&event, &regarding).await {
            warn!(%error, %reason, "cannot publish an Event");
        }
    }
}
