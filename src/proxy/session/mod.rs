//! A client's session: the table of live sessions, a request on its way through the session's
//! upstream session, the replay of its handshake, and what is kept of it beside forwarding.

pub(super) mod admission;
pub(super) mod bookkeeping;
pub(super) mod ending;
pub(super) mod exchange;
pub(super) mod home;
pub(super) mod pinned;
pub(super) mod replay;
pub(super) mod table;
