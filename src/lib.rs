//! mcp-session-operator: keeps MCP sessions alive through backend restarts and rollouts.
//!
//! - [`store`]: the session store (Redis standalone/TLS/Cluster, or embedded), the contract
//!   between proxy, operator, CLI and seed-style backends.
//! - [`api`]: the `McpSessionPolicy` custom resource.
//! - [`controller`]: reconciles policies into status, Events and metrics; leader election.
//! - [`webhook`]: admission webhooks: proxy injection into pods, policy validation, their TLS.
//! - [`proxy`]: the session proxy in front of an MCP server.
//! - [`gateway`]: the proxy in front of a policy's pods, in a Deployment of its own.
//! - [`hold`]: beside a gateway's backend, keeps a stopping pod until its sessions end.
//! - [`dev`]: the laptop loop: an MCP server restarted on code changes behind the proxy.
//! - [`metrics`]: Prometheus metrics.
//! - [`cli`]: the command line of the one binary.
//! - [`telemetry`]: logging and tracing set-up.
//! - [`serve`]: HTTP serving with timeouts and a connection cap, for every listener.
//! - [`count`]: a count that can be waited on (requests in flight, open connections).
//! - [`events`], [`fingerprint_key`]: Events on policies; a policy's fingerprint key Secret.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod controller;
pub mod count;
pub mod dev;
pub mod events;
pub mod fingerprint_key;
pub mod gateway;
pub mod hold;
pub mod metrics;
pub mod proxy;
pub mod serve;
pub mod store;
pub mod telemetry;
pub mod webhook;
mod wiring;
