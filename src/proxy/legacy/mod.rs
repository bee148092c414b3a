//! MCP's HTTP+SSE transport (2024-11-05): the transport itself and the handle through which it
//! reaches the proxy.

pub(super) mod host;
pub(super) mod transport;

pub(super) use transport::{Unanswered, open, opens_session, post, session_in_query};
