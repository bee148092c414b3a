//! What the SDK client scripts report: tests/mcp/client.py (the Python SDK) and
//! tests/mcp/ts/client.mjs (the TypeScript SDK) print one JSON summary line per client, and
//! where one process runs several clients, a line as each makes a call.

/// A line of a client script's output.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
pub enum ClientLine {
    Summary(ClientRun),
    /// `{"called": "python-3"}`: the client made a call.
    Called {
        called: String,
    },
}

impl ClientLine {
    /// The line, if it is one of the above.
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line).ok()
    }
}

/// One client's summary.
#[derive(Debug, serde::Deserialize)]
pub struct ClientRun {
    /// `python-3`, `typescript-12`: present where one process runs several clients.
    #[serde(default, rename = "client")]
    pub name: String,
    /// The tool it called.
    #[serde(default)]
    pub tool: String,
    pub calls: u64,
    pub errors: Vec<String>,
    /// Every session id the client was given; more than one means it lost its session.
    pub session_ids: Vec<String>,
    #[serde(default)]
    pub slowest_call_seconds: f64,
    /// How long its handshake and tool list took; `None` if it never got that far.
    #[serde(default)]
    pub ready_seconds: Option<f64>,
}

impl ClientRun {
    /// The summary on `line`, if it is one.
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line).ok()
    }

    /// When each failed call was sent, as the client reported it (`... (sent at RFC3339)`);
    /// `None` for an error that is no call's (the client ended).
    pub fn failed_calls_sent(&self) -> Vec<Option<chrono::DateTime<chrono::Utc>>> {
        self.errors.iter().map(|error| sent_at(error)).collect()
    }
}

/// When a failed call was sent, from the end of its error.
fn sent_at(error: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let (_, sent) = error.rsplit_once(" (sent at ")?;
    let sent = chrono::DateTime::parse_from_rfc3339(sent.strip_suffix(')')?).ok()?;
    Some(sent.with_timezone(&chrono::Utc))
}
