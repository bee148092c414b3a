//! What more than one benchmark uses: the MCP server they load, the connections of their
//! client fleets, and what a process spent.

#![allow(dead_code)] // Each benchmark uses a different part of this module.

pub mod client;
pub mod echo;
pub mod usage;

/// The session id an answer carries.
pub fn session_of<B>(response: &hyper::Response<B>) -> Option<String> {
    response
        .headers()
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
