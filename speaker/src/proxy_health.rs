//! Whether this node can deliver what it announces: kube-proxy's `/healthz` on the node,
//! the check cloud load balancers make before they send a node traffic.
//!
//! kube-proxy answers 200 while its rules are in sync with the API server, 503 when its
//! last sync is stale or the node is being deleted (or tainted for deletion by the cluster
//! autoscaler), and nothing at all when it is not running. A node whose kube-proxy fails
//! the check says so in its membership metadata, and the election passes it over for
//! every IP while another node on the segment passes (see
//! [`crate::election::ClusterView::candidates`]). When no node passes, the check is
//! ignored: announcing from a node that may not deliver beats announcing from none.
//!
//! One failed check is not enough to move IPs (a busy kube-proxy can miss one), nor one
//! good answer to bring them back: [`Verdict`] needs [`FAIL_AFTER`] failures in a row to
//! turn unhealthy and [`RECOVER_AFTER`] passes in a row to turn healthy again.
//!
//! `externalTrafficPolicy: Local` needs no check per Service here: the election already
//! requires a ready endpoint on the node (from the EndpointSlices, which is what
//! kube-proxy's `healthCheckNodePort` answers from too), and this node-wide check covers
//! the kube-proxy that would carry it.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio::time::{Instant, timeout};
use tracing::{debug, info, warn};

/// Failed checks in a row before the node counts as unable to deliver.
pub const FAIL_AFTER: u32 = 2;
/// Passed checks in a row before it counts as able again.
pub const RECOVER_AFTER: u32 = 4;

/// Where and how often to check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// kube-proxy's health server on this node (its `healthzBindAddress`).
    pub address: SocketAddr,
    pub interval: Duration,
}

/// What the speaker is told: the port of kube-proxy's health server, checked on the
/// node's InternalIP (the address membership binds to; kube-proxy's default
/// `healthzBindAddress` is 0.0.0.0:10256).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub port: u16,
    pub interval: Duration,
}

/// The longest reason published (the record's bound).
const MAX_REASON: usize = 256;

/// The path kube-proxy serves its health on.
const PATH: &str = "/healthz";

/// What the checks say, with the damping of [`FAIL_AFTER`] and [`RECOVER_AFTER`].
/// Pure: fed the outcome of each check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    healthy: bool,
    /// Checks in a row that disagree with `healthy`.
    against: u32,
}

impl Default for Verdict {
    /// Healthy until shown otherwise: a node is not passed over before its first checks.
    fn default() -> Self {
        Verdict {
            healthy: true,
            against: 0,
        }
    }
}

impl Verdict {
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Takes one check's outcome; returns the new verdict when it changed.
    pub fn observe(&mut self, passed: bool) -> Option<bool> {
        if passed == self.healthy {
            self.against = 0;
            return None;
        }
        self.against += 1;
        let needed = if self.healthy {
            FAIL_AFTER
        } else {
            RECOVER_AFTER
        };
        if self.against < needed {
            return None;
        }
        self.healthy = passed;
        self.against = 0;
        Some(passed)
    }
}

/// The verdict as published: `None` while kube-proxy passes, else why it fails (the
/// address and the last failure).
pub type Failing = Option<String>;

/// Checks every `interval` and publishes the verdict on the channel it returns; logs
/// each change, naming the address and the failure. Stops when the receiver is dropped.
pub fn spawn(options: Options) -> watch::Receiver<Failing> {
    let (tx, rx) = watch::channel(None);
    let url = format!("http://{}{PATH}", options.address);
    info!(url = %url, every = ?options.interval,
        "checking kube-proxy's health: while it fails, other nodes announce this node's IPs");
    tokio::spawn(async move {
        let mut verdict = Verdict::default();
        let mut next = Instant::now();
        loop {
            tokio::time::sleep_until(next).await;
            next += options.interval;
            // A check never takes longer than the interval, so checks do not pile up.
            let outcome = check(options.address, options.interval).await;
            if let Err(e) = &outcome {
                debug!(url = %url, error = %e, "kube-proxy health check failed");
            }
            let failing = match verdict.observe(outcome.is_ok()) {
                Some(false) => {
                    let error = outcome.err().unwrap_or_default();
                    warn!(url = %url, error = %error, checks = FAIL_AFTER,
                        "kube-proxy on this node fails its health check: other nodes announce its IPs while it does (none: this node goes on)");
                    // The record's bound counts characters.
                    Some(format!("{url}: {error}").chars().take(MAX_REASON).collect())
                }
                Some(true) => {
                    info!(url = %url, checks = RECOVER_AFTER,
                        "kube-proxy on this node passes its health check again: it may announce IPs");
                    None
                }
                None => continue,
            };
            if tx.send(failing).is_err() {
                return;
            }
        }
    });
    rx
}

/// One `GET /healthz`: Ok on a 200, else what went wrong. Bounded: `limit` for the
/// whole exchange, and the body is never read.
async fn check(address: SocketAddr, limit: Duration) -> Result<(), String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get(PATH)
            .header(hyper::header::HOST, address.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await;
        driver.abort();
        let status = response.map_err(|e| e.to_string())?.status();
        if status == hyper::StatusCode::OK {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    };
    timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_failure_moves_nothing_two_in_a_row_do() {
        let mut v = Verdict::default();
        assert!(v.healthy());
        assert_eq!(v.observe(false), None);
        assert_eq!(
            v.observe(true),
            None,
            "a pass in between starts the count again"
        );
        assert_eq!(v.observe(false), None);
        assert_eq!(v.observe(false), Some(false));
        assert!(!v.healthy());
        assert_eq!(v.observe(false), None, "no change, nothing to say");
    }

    #[test]
    fn recovery_needs_four_passes_in_a_row() {
        let mut v = Verdict::default();
        v.observe(false);
        v.observe(false);
        for _ in 0..3 {
            assert_eq!(v.observe(true), None);
        }
        assert_eq!(
            v.observe(false),
            None,
            "a flapping kube-proxy stays unhealthy"
        );
        for _ in 0..RECOVER_AFTER - 1 {
            assert_eq!(v.observe(true), None);
        }
        assert_eq!(v.observe(true), Some(true));
        assert!(v.healthy());
    }

    /// Against real sockets: a server answering 200, one answering 503, a closed port,
    /// and one that accepts and never answers.
    #[tokio::test]
    async fn checks_read_the_status_and_are_bounded_in_time() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        async fn serve(reply: &'static [u8]) -> SocketAddr {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    if !reply.is_empty() {
                        let _ = s.write_all(reply).await;
                    } else {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                }
            });
            address
        }
        let ok = serve(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let stale = serve(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        let silent = serve(b"").await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let limit = Duration::from_millis(300);
        assert_eq!(check(ok, limit).await, Ok(()));
        assert_eq!(
            check(stale, limit).await,
            Err("answered 503 Service Unavailable".into())
        );
        let refused = check(closed, limit).await.unwrap_err();
        assert!(refused.contains("refused"), "{refused}");
        assert_eq!(
            check(silent, limit).await,
            Err("no answer within 300ms".into())
        );
    }
}
