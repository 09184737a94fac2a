//! The metrics server's connections, bounded: it listens on the host network of every
//! node, so any Pod can reach it, and a slowloris must not grow it past its memory limit
//! (the kernel would kill the speaker and its VIPs would fail over).
//!
//! * every connection lives at most [`Limits::lifetime`], and must send its request
//!   headers within [`Limits::header_timeout`];
//! * at most [`Limits::per_source`] connections per client address and
//!   [`Limits::total`] in all. A new connection always gets in: at a cap, the oldest
//!   connection (of that address, or overall) is closed instead. Requests are answered
//!   in milliseconds, so the oldest connections are the idle ones, and a scrape is never
//!   locked out by connections it did not open.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// How much the server lets its clients hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections in all.
    pub total: usize,
    /// Open connections from one client address.
    pub per_source: usize,
    /// Time to send the request headers.
    pub header_timeout: Duration,
    /// Time from accept to the end of the answer.
    pub lifetime: Duration,
    /// Largest request head read (hyper's smallest buffer is 8 KiB).
    pub max_request_head: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            total: 256,
            per_source: 16,
            header_timeout: Duration::from_secs(3),
            lifetime: Duration::from_secs(10),
            max_request_head: 8 * 1024,
        }
    }
}

/// The open connections, oldest first, and which one to close for a newcomer.
#[derive(Debug, Default)]
pub(crate) struct Table {
    next: u64,
    open: BTreeMap<u64, IpAddr>,
    per_source: HashMap<IpAddr, usize>,
}

impl Table {
    /// Admits a connection from `source`; returns its id and the connection to close to
    /// make room for it, if any.
    pub(crate) fn admit(&mut self, source: IpAddr, limits: &Limits) -> (u64, Option<u64>) {
        let from_source = self.per_source.get(&source).copied().unwrap_or(0);
        let evict = if from_source >= limits.per_source.max(1) {
            self.open
                .iter()
                .find(|(_, s)| **s == source)
                .map(|(id, _)| *id)
        } else if self.open.len() >= limits.total.max(1) {
            self.open.keys().next().copied()
        } else {
            None
        };
        if let Some(id) = evict {
            self.close(id);
        }
        let id = self.next;
        self.next += 1;
        self.open.insert(id, source);
        *self.per_source.entry(source).or_default() += 1;
        (id, evict)
    }

    /// Forgets connection `id` (closed by either side); false when it was not open.
    pub(crate) fn close(&mut self, id: u64) -> bool {
        let Some(source) = self.open.remove(&id) else {
            return false;
        };
        if let Some(n) = self.per_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&source);
            }
        }
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.open.len()
    }
}

#[derive(Default)]
struct Shared {
    table: Table,
    tasks: HashMap<u64, AbortHandle>,
    warned_at: Option<Instant>,
}

/// Forgets its connection however the connection task ends (finished or aborted).
struct Slot {
    shared: Arc<Mutex<Shared>>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.table.close(self.id);
        shared.tasks.remove(&self.id);
    }
}

/// Accepts and serves connections for ever, within `limits`.
pub(crate) async fn serve(listener: TcpListener, app: Router, limits: Limits) {
    let shared = Arc::new(Mutex::new(Shared::default()));
    let service = TowerToHyperService::new(app);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, or a connection reset before accept: keep
                // serving the others.
                tracing::debug!("metrics server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
        let (id, evicted) = guard.table.admit(peer.ip(), &limits);
        if let Some(old) = evicted {
            if let Some(task) = guard.tasks.remove(&old) {
                task.abort();
            }
            let now = Instant::now();
            if guard
                .warned_at
                .is_none_or(|at| now >= at + Duration::from_secs(60))
            {
                guard.warned_at = Some(now);
                tracing::warn!(
                    client = %peer.ip(),
                    open = guard.table.len(),
                    "metrics server at its connection limit (per client {}, total {}): closing \
                     the oldest connection; something is holding connections open",
                    limits.per_source,
                    limits.total
                );
            }
        }
        let slot = Slot {
            shared: Arc::clone(&shared),
            id,
        };
        let service = service.clone();
        // Spawned while the table is locked, so the task cannot end (and forget its id)
        // before its abort handle is recorded.
        let task = tokio::spawn(async move {
            let _slot = slot;
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false)
                .max_buf_size(limits.max_request_head.max(8 * 1024))
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.lifetime, connection).await;
        });
        guard.tasks.insert(id, task.abort_handle());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_source: usize) -> Limits {
        Limits {
            total,
            per_source,
            ..Limits::default()
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_client_at_its_cap_loses_its_own_oldest_connection_not_anyone_elses() {
        let l = limits(100, 2);
        let mut t = Table::default();
        let (other, _) = t.admit(ip(9), &l);
        let (a0, none) = t.admit(ip(1), &l);
        assert_eq!(none, None);
        let (_a1, none) = t.admit(ip(1), &l);
        assert_eq!(none, None);
        let (_a2, evicted) = t.admit(ip(1), &l);
        assert_eq!(evicted, Some(a0), "the client's oldest goes");
        assert!(
            t.open.contains_key(&other),
            "another client's connection stays"
        );
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn at_the_total_cap_the_oldest_connection_goes_and_a_newcomer_always_gets_in() {
        let l = limits(3, 10);
        let mut t = Table::default();
        let ids: Vec<u64> = (1..=3).map(|n| t.admit(ip(n), &l).0).collect();
        let (new, evicted) = t.admit(ip(4), &l);
        assert_eq!(evicted, Some(ids[0]));
        assert!(t.open.contains_key(&new));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn closing_frees_the_clients_share_once() {
        let l = limits(10, 1);
        let mut t = Table::default();
        let (a, _) = t.admit(ip(1), &l);
        assert!(t.close(a));
        assert!(!t.close(a), "a second close is a no-op");
        let (_, evicted) = t.admit(ip(1), &l);
        assert_eq!(evicted, None, "the client's share was freed");
        assert_eq!(t.per_source.get(&ip(1)), Some(&1));
    }
}
