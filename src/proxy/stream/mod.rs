//! Event streams: the relay of an upstream stream to its client, the event log behind
//! `Last-Event-ID` resumption, and the listening streams a replay reopens.

pub(super) mod event_log;
pub(super) mod host;
pub(super) mod listening;
pub(super) mod relay;
pub(super) mod resume;
