//! The environment variables the binary reads: one name for the flag that reads each and for the
//! webhook that sets it in injected pods.

pub const REDIS_URL: &str = "MCP_SESSION_REDIS_URL";
pub const KEY_PREFIX: &str = "MCP_SESSION_KEY_PREFIX";
pub const REDIS_CLUSTER: &str = "MCP_SESSION_REDIS_CLUSTER";
pub const REDIS_CA_FILE: &str = "MCP_SESSION_REDIS_CA_FILE";
pub const FINGERPRINT_KEY: &str = "MCP_SESSION_FINGERPRINT_KEY";
pub const DRAIN_TOKEN: &str = "MCP_SESSION_DRAIN_TOKEN";
pub const ALLOWED_ORIGINS: &str = "MCP_SESSION_ALLOWED_ORIGINS";
/// The pod's name, from the downward API.
pub const POD_NAME: &str = "POD_NAME";
