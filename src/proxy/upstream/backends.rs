//! The MCP servers a proxy sends to: the one beside it (sidecar mode, fixed), or the serving
//! pods of a policy (gateway mode, discovered, driven by `crate::gateway`). Each backend keeps its
//! own connections; a session is served by one backend at a time and holds an [`Assigned`]
//! handle on it, which is also how the least-loaded backend is found for a new session.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Uri};
use tokio::sync::watch;

use crate::proxy::upstream::pool::Pool;
use crate::serve;

/// How long a discovered backend that refused a connection gets no new requests, unless the
/// pod watch reports it serving again first. Short: a refused connect is cheap to try again.
const REFUSED_PAUSE: Duration = Duration::from_secs(2);

/// One MCP server: where it is and the connections to it.
pub struct Backend {
    /// The pod's name (gateway mode), or the address (sidecar mode): for logs.
    name: Box<str>,
    address: Arc<str>,
    /// The `Host` of a request that came without one.
    host: HeaderValue,
    /// A pool of connections per serving thread (see [`serve::serving_thread`]), so that a
    /// call and the upstream connection it goes out on are served by one thread; and one for
    /// what runs elsewhere (background replays, the SSE transport's streams).
    pools: Vec<Pool>,
    shared: Pool,
    /// Whether the pod watch says it takes requests (ready, not terminating).
    serving: AtomicBool,
    /// Whether the pod watch dropped it: the pod is gone, or its address is another's now.
    gone: AtomicBool,
    /// A refused connection pauses it until this, in ms since `epoch`.
    paused_until_ms: AtomicU64,
    epoch: Instant,
    /// Sessions (and requests in flight with them) assigned to it; counted for discovered
    /// backends only, the ones a new session chooses among.
    assigned: AtomicUsize,
    /// Whether its failures end at once, for the request to go to another backend
    /// (discovered), or are waited out (the fixed one restarts in place).
    discovered: bool,
}

impl Backend {
    fn new(
        name: &str,
        address: String,
        host: &str,
        serving_threads: usize,
        discovered: bool,
    ) -> Self {
        Self {
            name: name.into(),
            host: HeaderValue::from_str(host).unwrap_or(HeaderValue::from_static("localhost")),
            pools: (0..serving_threads)
                .map(|_| Pool::new(address.clone()))
                .collect(),
            shared: Pool::new(address.clone()),
            address: address.into(),
            serving: AtomicBool::new(true),
            gone: AtomicBool::new(false),
            paused_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            assigned: AtomicUsize::new(0),
            discovered,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn host(&self) -> &HeaderValue {
        &self.host
    }

    /// The connections of the thread this runs on.
    pub fn pool(&self) -> &Pool {
        serve::serving_thread()
            .and_then(|thread| self.pools.get(thread))
            .unwrap_or(&self.shared)
    }

    /// Whether a failure to reach it sends the request elsewhere instead of waiting for it.
    pub fn is_discovered(&self) -> bool {
        self.discovered
    }

    /// Whether new requests and sessions may go to it. The fixed backend always does (requests
    /// wait for it): asked on every request, it reads no clock.
    pub fn takes_requests(&self) -> bool {
        !self.discovered
            || (self.serving.load(Ordering::Relaxed) && self.now_ms() >= self.paused_until())
    }

    /// Whether the pod is gone (a discovered backend the pod watch dropped). A terminating pod
    /// is not gone until it has exited: it takes nothing new, yet serves the sessions that
    /// stay on it (drain strategy `Wait`).
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// It refused a connection: no new requests for a while (a discovered backend only; the
    /// fixed one is all there is).
    pub fn refused(&self) {
        if self.discovered {
            let until = self.now_ms() + REFUSED_PAUSE.as_millis() as u64;
            self.paused_until_ms.store(until, Ordering::Relaxed);
        }
    }

    fn paused_until(&self) -> u64 {
        self.paused_until_ms.load(Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn load(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// A backend a session (or a request) is assigned to; counted in its load while it lives.
/// The fixed backend is not counted: it is the only choice, and every serving thread would
/// write the one counter on every request.
pub struct Assigned(Arc<Backend>);

impl Assigned {
    fn new(backend: Arc<Backend>) -> Self {
        if backend.discovered {
            backend.assigned.fetch_add(1, Ordering::Relaxed);
        }
        Self(backend)
    }

    /// Whether two handles are on the same backend.
    pub fn same(&self, other: &Assigned) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Clone for Assigned {
    fn clone(&self) -> Self {
        Self::new(self.0.clone())
    }
}

impl Drop for Assigned {
    fn drop(&mut self) {
        if self.0.discovered {
            self.0.assigned.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl std::ops::Deref for Assigned {
    type Target = Backend;

    fn deref(&self) -> &Backend {
        &self.0
    }
}

impl fmt::Debug for Assigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A backend as the pod watch reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The pod's name.
    pub name: String,
    /// `ip:port`.
    pub address: String,
    /// Ready and not terminating: it takes new sessions and requests.
    pub serving: bool,
}

/// The backends a proxy may send to.
pub struct Backends {
    current: RwLock<Vec<Arc<Backend>>>,
    /// Bumped on every change, for whoever waits for a serving backend.
    changed: watch::Sender<u64>,
    serving_threads: usize,
    discovered: bool,
    /// Whether the set is known: the fixed one always, discovered ones once first updated.
    known: AtomicBool,
}

impl Backends {
    /// The MCP server beside the proxy, at `upstream`: always the one to send to; while it
    /// restarts, requests wait for it.
    pub fn fixed(upstream: &Uri, serving_threads: usize) -> Arc<Self> {
        let address = address_of(upstream);
        let host = upstream.authority().map_or("", |a| a.as_str());
        let backend = Backend::new(&address, address.clone(), host, serving_threads, false);
        Arc::new(Self {
            current: RwLock::new(vec![Arc::new(backend)]),
            changed: watch::Sender::new(0),
            serving_threads,
            discovered: false,
            known: AtomicBool::new(true),
        })
    }

    /// Backends that [`Self::update`] sets (gateway mode); none until then.
    pub fn discovered(serving_threads: usize) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::default(),
            changed: watch::Sender::new(0),
            serving_threads,
            discovered: true,
            known: AtomicBool::new(false),
        })
    }

    /// The fixed backend's address, which the quiesce follows through its restarts; `None`
    /// for discovered ones (gateway mode), which are never waited for.
    pub fn local_address(&self) -> Option<String> {
        if self.discovered {
            return None;
        }
        self.read().first().map(|b| b.address.to_string())
    }

    /// For logs: the one address, or how many backends.
    pub fn describe(&self) -> String {
        match self.local_address() {
            Some(address) => address,
            None => format!("{} discovered backends", self.read().len()),
        }
    }

    /// Makes the set what the pod watch reports: new pods are added (their connections made
    /// as needed), gone ones dropped (sessions assigned to them keep their handle until they
    /// move), every one's `serving` as reported. A pod whose address changed is a new backend.
    pub fn update(&self, endpoints: &[Endpoint]) {
        let mut current = self.write();
        let mut next = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let known = current
                .iter()
                .find(|b| *b.name == *endpoint.name && *b.address == *endpoint.address);
            let backend = match known {
                Some(backend) => backend.clone(),
                None => Arc::new(Backend::new(
                    &endpoint.name,
                    endpoint.address.clone(),
                    &endpoint.address,
                    self.serving_threads,
                    true,
                )),
            };
            let was = backend.serving.swap(endpoint.serving, Ordering::Relaxed);
            if endpoint.serving && !was {
                // Serving again (a restarted container): worth a try at once.
                backend.paused_until_ms.store(0, Ordering::Relaxed);
            }
            next.push(backend);
        }
        for gone in current
            .iter()
            .filter(|b| !next.iter().any(|n| Arc::ptr_eq(b, n)))
        {
            gone.serving.store(false, Ordering::Relaxed);
            gone.gone.store(true, Ordering::Relaxed);
        }
        *current = next;
        drop(current);
        self.known.store(true, Ordering::Relaxed);
        self.changed.send_modify(|version| *version += 1);
    }

    /// Whether the backends are a policy's pods (gateway mode), not the one beside the proxy.
    pub fn is_discovered(&self) -> bool {
        self.discovered
    }

    /// The backend of pod `name` at `address`, while the pod watch reports it (serving or
    /// not): where a session pinned to that pod goes.
    pub fn find(&self, name: &str, address: &str) -> Option<Assigned> {
        self.read()
            .iter()
            .find(|b| *b.name == *name && *b.address == *address)
            .cloned()
            .map(Assigned::new)
    }

    /// Whether the set is known (a gateway is not ready before its pod watch has listed the
    /// pods once: it would hold every request meanwhile).
    pub fn known(&self) -> bool {
        self.known.load(Ordering::Relaxed)
    }

    /// The backend a new session (or a request without one) goes to: the one with the fewest
    /// assigned sessions among those that take requests. The fixed backend, whatever its
    /// state: requests wait for it.
    pub fn pick(&self) -> Option<Assigned> {
        let current = self.read();
        if !self.discovered {
            return current.first().cloned().map(Assigned::new);
        }
        current
            .iter()
            .filter(|b| b.takes_requests())
            .min_by_key(|b| b.load())
            .cloned()
            .map(Assigned::new)
    }

    /// [`Self::pick`], waiting until `deadline` for a backend to take requests (the pod watch
    /// reports one, or a paused one's pause ends).
    pub async fn pick_by(&self, deadline: Instant) -> Option<Assigned> {
        let mut changed = self.changed.subscribe();
        loop {
            if let Some(backend) = self.pick() {
                return Some(backend);
            }
            let wake = self.next_unpause().map_or(deadline, |at| at.min(deadline));
            if Instant::now() >= deadline {
                return None;
            }
            let _ = tokio::time::timeout_at(wake.into(), changed.changed()).await;
        }
    }

    /// When the earliest paused backend that serves may take requests again.
    fn next_unpause(&self) -> Option<Instant> {
        self.read()
            .iter()
            .filter(|b| b.serving.load(Ordering::Relaxed))
            .map(|b| b.epoch + Duration::from_millis(b.paused_until()))
            .min()
    }

    /// Every backend, its assigned sessions, and whether it takes requests.
    #[cfg(test)]
    fn loads(&self) -> Vec<Load> {
        self.read()
            .iter()
            .map(|b| Load {
                name: b.name.to_string(),
                sessions: b.load(),
                takes_requests: b.takes_requests(),
            })
            .collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<Backend>>> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<Backend>>> {
        self.current.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// What [`Backends::loads`] tells of one backend.
#[cfg(test)]
#[derive(Debug)]
struct Load {
    name: String,
    sessions: usize,
    takes_requests: bool,
}

impl fmt::Debug for Backends {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// `host:port` of `uri` (port 80 if it names none).
fn address_of(uri: &Uri) -> String {
    let authority = uri.authority().map_or("", |a| a.as_str());
    if uri.port().is_some() {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str, port: u16, serving: bool) -> Endpoint {
        Endpoint {
            name: name.into(),
            address: format!("127.0.0.1:{port}"),
            serving,
        }
    }

    #[test]
    fn new_sessions_go_to_the_least_loaded_serving_backend() {
        let backends = Backends::discovered(1);
        assert!(backends.pick().is_none(), "none until the watch reports");
        assert!(!backends.known());
        backends.update(&[endpoint("a", 1, true), endpoint("b", 2, true)]);
        assert!(backends.known());
        let first = backends.pick().expect("a backend");
        let second = backends.pick().expect("a backend");
        assert!(!first.same(&second), "the second goes to the other one");
        let third = backends.pick().expect("a backend");
        let fourth = backends.pick().expect("a backend");
        assert!(!third.same(&fourth), "two each");
        drop((first, third));
        let fifth = backends.pick().expect("a backend");
        assert!(
            !fifth.same(&second),
            "to the one whose sessions ended: {:?}",
            backends.loads()
        );
    }

    #[test]
    fn terminating_gone_and_refusing_backends_take_nothing_new() {
        let backends = Backends::discovered(1);
        backends.update(&[endpoint("a", 1, true), endpoint("b", 2, false)]);
        let a = backends.pick().expect("a serves");
        assert_eq!(a.name(), "a");
        assert_eq!(backends.pick().expect("still a").name(), "a");
        a.refused();
        assert!(backends.pick().is_none(), "a refused, b terminates");
        backends.update(&[endpoint("b", 2, true)]);
        assert_eq!(backends.pick().expect("b now").name(), "b");
        assert!(!a.takes_requests(), "a is gone");
        // A pod that comes back serving is tried at once, its pause forgotten.
        backends.update(&[endpoint("a", 1, true), endpoint("b", 2, true)]);
        let again = backends.loads();
        let names: Vec<&str> = again.iter().map(|load| load.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(again.iter().all(|load| load.takes_requests), "{again:?}");
    }

    #[test]
    fn a_terminating_pod_is_found_for_its_sessions_until_it_is_gone() {
        let backends = Backends::discovered(1);
        backends.update(&[endpoint("a", 1, true)]);
        let a = backends.pick().expect("a serves");
        backends.update(&[endpoint("a", 1, false)]);
        assert!(!a.takes_requests() && !a.is_gone(), "terminating");
        assert!(backends.pick().is_none(), "nothing new goes to it");
        let found = backends.find("a", "127.0.0.1:1").expect("still reported");
        assert!(found.same(&a));
        assert!(
            backends.find("a", "127.0.0.1:2").is_none(),
            "another address"
        );
        backends.update(&[]);
        assert!(a.is_gone());
        assert!(backends.find("a", "127.0.0.1:1").is_none());
    }

    #[test]
    fn the_fixed_backend_is_always_the_one() {
        let backends = Backends::fixed(&"http://127.0.0.1:9".parse().expect("uri"), 2);
        let backend = backends.pick().expect("the one");
        assert_eq!(
            backends.loads()[0].sessions,
            0,
            "the fixed backend's load is not counted"
        );
        backend.refused();
        assert!(backends.pick().is_some_and(|b| b.same(&backend)));
        assert_eq!(backends.local_address().as_deref(), Some("127.0.0.1:9"));
        assert!(Backends::discovered(1).local_address().is_none());
    }

    #[tokio::test]
    async fn a_request_waits_for_a_backend_to_serve() {
        let backends = Backends::discovered(1);
        let waiting = {
            let backends = Arc::clone(&backends);
            tokio::spawn(async move {
                backends
                    .pick_by(Instant::now() + Duration::from_secs(5))
                    .await
                    .map(|b| b.name().to_owned())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        backends.update(&[endpoint("late", 1, true)]);
        assert_eq!(waiting.await.expect("joined").as_deref(), Some("late"));
        let none = Backends::discovered(1)
            .pick_by(Instant::now() + Duration::from_millis(20))
            .await;
        assert!(none.is_none());
    }
}
