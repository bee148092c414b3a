//! Event ids and the per-session event log behind `Last-Event-ID` resumption.
//!
//! The proxy numbers the events it sends on a session's streams itself: the upstream's ids name
//! events of one upstream process and mean nothing after it restarts, or on another pod. An id
//! is `{kind}{stream}-{seq}`: `g` for a GET (listening) stream or `p` for a POST's response
//! stream, 64 random bits naming the stream (unique across proxies without coordination), and
//! the event's number on it. The log is written behind the stream, batched, so that relaying an
//! event never waits for the store.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::proxy::mcp::protocol::StreamKind;
use crate::store::{LogBound, LoggedEvent, SessionId, SessionStore};

/// Events buffered for the writer; beyond this the log skips events rather than grow memory
/// while the store is slow (the stream itself is never held up).
const QUEUE: usize = 8192;
/// Events the writer takes per batch.
const BATCH: usize = 512;

/// A stream's identity inside event ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamTag {
    pub kind: StreamKind,
    pub stream: u64,
}

impl StreamTag {
    pub fn new(kind: StreamKind) -> Self {
        Self {
            kind,
            stream: rand::random(),
        }
    }

    pub fn event_id(&self, seq: u64) -> String {
        format!("{self}-{seq}")
    }

    /// The stream and number of an event id this proxy (or another) gave out.
    pub fn parse(event_id: &str) -> Option<(Self, u64)> {
        let kind = match event_id.as_bytes().first()? {
            b'g' => StreamKind::Listen,
            b'p' => StreamKind::Response,
            _ => return None,
        };
        let (stream, seq) = event_id.get(1..)?.split_once('-')?;
        if stream.len() != 16 || !stream.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some((
            Self {
                kind,
                stream: u64::from_str_radix(stream, 16).ok()?,
            },
            seq.parse().ok()?,
        ))
    }
}

impl fmt::Display for StreamTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            StreamKind::Listen => 'g',
            StreamKind::Response => 'p',
        };
        write!(f, "{kind}{:016x}", self.stream)
    }
}

/// The logged events of one stream that follow `seq`, in order.
pub fn after(log: Vec<LoggedEvent>, tag: StreamTag, seq: u64) -> Vec<(u64, LoggedEvent)> {
    log.into_iter()
        .filter_map(|event| match StreamTag::parse(&event.id) {
            Some((t, n)) if t == tag && n > seq => Some((n, event)),
            _ => None,
        })
        .collect()
}

/// The upstream's id of the newest logged event of a stream that has one: where the upstream
/// resumes it.
pub fn last_upstream_id(log: &[LoggedEvent], tag: StreamTag) -> Option<String> {
    log.iter()
        .rev()
        .filter(|event| StreamTag::parse(&event.id).is_some_and(|(t, _)| t == tag))
        .find_map(|event| event.upstream_id.clone())
}

enum Command {
    Append(SessionId, LoggedEvent),
    Flush(oneshot::Sender<()>),
}

/// The write-behind queue of the event log.
#[derive(Clone)]
pub struct EventLog {
    queue: mpsc::Sender<Command>,
    /// Events the log could not take (the store was too slow): those cannot be resumed.
    skipped: Counter,
}

impl EventLog {
    /// Starts the writer task; it keeps what `bound` allows of each session's newest events.
    pub fn start(store: Arc<dyn SessionStore>, bound: LogBound, skipped: Counter) -> Self {
        let (queue, commands) = mpsc::channel(QUEUE);
        tokio::spawn(write(store, bound, skipped.clone(), commands));
        Self { queue, skipped }
    }

    pub fn append(&self, id: &SessionId, event: LoggedEvent) {
        if self
            .queue
            .try_send(Command::Append(id.clone(), event))
            .is_err()
        {
            self.skipped.inc();
        }
    }

    /// Waits until everything appended so far has been written (or failed to be).
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.queue.send(Command::Flush(done)).await.is_ok() {
            let _ = written.await;
        }
    }
}

async fn write(
    store: Arc<dyn SessionStore>,
    bound: LogBound,
    skipped: Counter,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while commands.recv_many(&mut batch, BATCH).await > 0 {
        let mut by_session: HashMap<SessionId, Vec<LoggedEvent>> = HashMap::new();
        let mut flushed = Vec::new();
        for command in batch.drain(..) {
            match command {
                // Larger than a whole log may be: the store would not keep it.
                Command::Append(id, event) if event.to_entry().len() > bound.bytes => {
                    skipped.inc();
                    warn!(session = %id, event = %event.id, limit = bound.bytes, "an event too large for the resumption log; not logged (--event-log-bytes)");
                }
                Command::Append(id, event) => by_session.entry(id).or_default().push(event),
                Command::Flush(done) => flushed.push(done),
            }
        }
        let writes = by_session.iter().map(|(id, events)| {
            let store = &store;
            async move {
                if let Err(error) = store.append_events(id, events, bound).await {
                    warn!(session = %id, %error, events = events.len(), "cannot log events for resumption");
                }
            }
        });
        futures::future::join_all(writes).await;
        for done in flushed {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_round_trip_and_hostile_ones_are_refused() {
        for kind in [StreamKind::Listen, StreamKind::Response] {
            let tag = StreamTag::new(kind);
            let id = tag.event_id(42);
            assert_eq!(StreamTag::parse(&id), Some((tag, 42)), "{id}");
        }
        for bad in [
            "",
            "g",
            "x0123456789abcdef-1",
            "g0123-1",
            "g0123456789abcdefg-1",
            "g0123456789abcdef-",
            "g0123456789abcdef--1",
            "gé123456789abcdef-1",
            "g+123456789abcdef-1",
        ] {
            assert_eq!(StreamTag::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn what_follows_an_event_on_its_own_stream() {
        let (a, b) = (
            StreamTag::new(StreamKind::Listen),
            StreamTag::new(StreamKind::Response),
        );
        let logged = |tag: StreamTag, n: u64| LoggedEvent {
            id: tag.event_id(n),
            event: None,
            data: n.to_string(),
            ..Default::default()
        };
        let log = vec![
            logged(a, 1),
            logged(b, 1),
            logged(a, 2),
            LoggedEvent {
                id: "junk".into(),
                ..Default::default()
            },
            logged(a, 3),
        ];
        assert_eq!(last_upstream_id(&log, a), None);
        let next: Vec<u64> = after(log.clone(), a, 1)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(next, [2, 3]);
        let mut with_ids = log;
        with_ids[0].upstream_id = Some("u-a1".into());
        with_ids[1].upstream_id = Some("u-b1".into());
        assert_eq!(last_upstream_id(&with_ids, a).as_deref(), Some("u-a1"));
        assert_eq!(last_upstream_id(&with_ids, b).as_deref(), Some("u-b1"));
    }
}
