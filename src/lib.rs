//! mcp-session-operator: keeps MCP sessions alive through backend restarts and rollouts.
//!
//! - [`store`]: the session store (Redis standalone/TLS/Cluster, or embedded), the contract
//!   between proxy, operator, CLI and seed-style backends.
//! - [`cli`]: the command line of the one binary.
//! - [`telemetry`]: logging and tracing set-up.

pub mod cli;
pub mod store;
pub mod telemetry;
