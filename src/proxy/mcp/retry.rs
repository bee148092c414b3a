//! Which requests the proxy may send again when the upstream went away after receiving them.
//!
//! A request whose response was lost may have been executed. Sending it again is safe only when
//! executing it twice has the effect of executing it once: MCP's read-only methods, and
//! `tools/call` of tools the server itself declares `readOnlyHint` or `idempotentHint` in its
//! `tools/list` answers (the proxy learns them from the answers it relays). Everything else gets
//! a JSON-RPC error for its id instead: never a silent second execution.

use std::collections::HashMap;
use std::sync::RwLock;

use serde::Deserialize;

use crate::proxy::mcp::protocol::MessageHead;

/// Methods without side effects on the server's world (MCP 2025-11-25).
const READ_ONLY_METHODS: [&str; 9] = [
    "ping",
    "tools/list",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "prompts/list",
    "prompts/get",
    "completion/complete",
    "logging/setLevel",
];

/// Tool safety as the upstream declared it, by tool name.
#[derive(Debug, Default)]
pub struct RetryPolicy {
    tools: RwLock<HashMap<Box<str>, bool>>,
}

#[derive(Deserialize)]
struct ToolsListAnswer {
    result: ToolsListResult,
}

#[derive(Deserialize)]
struct ToolsListResult {
    tools: Vec<ToolEntry>,
}

#[derive(Deserialize)]
struct ToolEntry {
    name: String,
    #[serde(default)]
    annotations: Option<ToolAnnotations>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ToolAnnotations {
    #[serde(default)]
    read_only_hint: Option<bool>,
    #[serde(default)]
    idempotent_hint: Option<bool>,
}

impl RetryPolicy {
    /// May `request` be sent again after the upstream lost it?
    pub fn allows(&self, request: &MessageHead) -> bool {
        let Some(method) = request.method.as_deref() else {
            return false; // A response to the server: it is the server's to ask again.
        };
        if method.starts_with("notifications/") || READ_ONLY_METHODS.contains(&method) {
            return true;
        }
        method == "tools/call"
            && request.tool().is_some_and(|tool| {
                self.tools
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(tool)
                    .copied()
                    .unwrap_or(false)
            })
    }

    /// Learns tool annotations from a `tools/list` answer (one page of it); other messages are
    /// ignored.
    pub fn learn(&self, message: &[u8]) {
        let Ok(answer) = serde_json::from_slice::<ToolsListAnswer>(message) else {
            return;
        };
        let mut tools = self.tools.write().unwrap_or_else(|p| p.into_inner());
        for tool in answer.result.tools {
            let safe = tool
                .annotations
                .is_some_and(|a| a.read_only_hint == Some(true) || a.idempotent_hint == Some(true));
            tools.insert(tool.name.into_boxed_str(), safe);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> MessageHead {
        MessageHead::of(text.as_bytes()).unwrap()
    }

    #[test]
    fn only_what_is_safe_to_execute_twice_is_retried() {
        let policy = RetryPolicy::default();
        let call = |tool: &str| {
            head(&format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{tool}"}}}}"#
            ))
        };
        assert!(policy.allows(&head(r#"{"id":1,"method":"tools/list"}"#)));
        assert!(policy.allows(&head(r#"{"method":"notifications/initialized"}"#)));
        assert!(
            !policy.allows(&call("add")),
            "unknown until the server says"
        );
        assert!(!policy.allows(&head(r#"{"id":1,"result":{}}"#)));

        policy.learn(
            br#"{"jsonrpc":"2.0","id":2,"result":{"tools":[
            {"name":"add","annotations":{"readOnlyHint":true}},
            {"name":"put","annotations":{"idempotentHint":true,"readOnlyHint":false}},
            {"name":"send_mail","annotations":{"destructiveHint":true}},
            {"name":"plain"}]}}"#,
        );
        assert!(policy.allows(&call("add")));
        assert!(policy.allows(&call("put")));
        assert!(!policy.allows(&call("send_mail")));
        assert!(!policy.allows(&call("plain")));
        assert!(!policy.allows(&call("never-listed")));

        // A later listing wins: the server changed its mind.
        policy.learn(br#"{"id":3,"result":{"tools":[{"name":"add"}]}}"#);
        assert!(!policy.allows(&call("add")));
        // Garbage teaches nothing.
        policy.learn(b"{\"result\":{\"tools\":7}}");
        policy.learn(b"\xff");
        assert!(policy.allows(&call("put")));
    }
}
