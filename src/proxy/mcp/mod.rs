//! What the proxy knows of MCP itself, apart from serving it: the HTTP transports' headers and
//! messages, server-sent events, which requests may be sent twice, and credential fingerprints.
//! Pure knowledge: nothing here imports from the proxy's other layers.

pub(super) mod fingerprint;
pub(super) mod protocol;
pub(super) mod retry;
pub(super) mod sse;
