//! Membership as election needs it: which declared nodes are alive, which subnets each
//! can reach, and which have settled.
//!
//! Two rules keep every node's view the same, so that no IP has two owners:
//! * **Joining**: a speaker announces nothing until it has heard from every declared
//!   peer, or for `join_grace` at most. Otherwise a restarted node, alone in its own
//!   view for a moment, would claim every IP.
//! * **Settling**: a node declares itself settled in its own gossiped metadata once it
//!   has been up for `hold` — or at once when nobody alive started more than
//!   `join_grace` before it (a cold start: every node starting together). A node that is not settled is elected only when no settled
//!   node can serve, so a node that comes back takes its IPs back once, after the
//!   hold-down, and a crash-looping node never drags IPs back and forth. Because the
//!   node declares it itself, all nodes see the same flag (a local "first seen" clock
//!   would differ between the returning node and the others).
//!
//! * **Damping**: a node cut off again (its link lost a subnet, or its peers declared it
//!   down while it was on the smaller side) waits twice as long each time within a
//!   minute, up to 16 hold-downs (`crate::damping`), so a flaky link moves its IPs away
//!   once and leaves them there until it is quiet. Moving away is never delayed.
//!
//! What does *not* count: datagrams that fail authentication, replays, floods. Only
//! authenticated, fresh traffic from a peer changes who is alive, so no packet from
//! outside the keyring can black out or move an IP. A speaker whose key is wrong or
//! missing therefore acts as a node cut off from the others (as it is): it logs an
//! error naming the source of what it cannot authenticate, counts it in
//! `membership_rejected_datagrams_total`, and before announcing an IP it probes for it
//! (RFC 5227): the cluster's owner answers, so the stray node does not claim it.
//! (Until this version a lone node went silent while unauthenticated datagrams
//! arrived, which one spoofed packet every few seconds could exploit.)
//!
//! `started_at_ms` is the wall clock, compared across nodes, but only to tell a cold
//! start from a rejoin: a node whose clock is off by more than `join_grace` either
//! waits out one hold-down it could have skipped or skips one; it is never locked out
//! and never makes two owners (`settled` is declared by each node itself and gossiped,
//! so every node's election sees the same flag). Membership identity uses no clock.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use ferrolb_api::Family;
use ferrolb_api::manifests::Manifests;
use ipnetwork::IpNetwork;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use crate::damping::{self, Damping};
use crate::election::{ClusterView, MemberView};
use crate::membership::{self, Config, Members, Membership, NodeMeta};
use crate::proxy_health;

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub port: u16,
    /// The keys that seal membership; `None`: unencrypted (logged as an error).
    pub keyring: Option<membership::Keyring>,
    /// Where the keyring is read again from, so a rotation needs no restart.
    pub keyring_file: Option<std::path::PathBuf>,
    pub settings: membership::Settings,
    /// How long a (re)started node waits before taking IPs back from settled nodes.
    pub hold: Duration,
    /// How long a starting node waits for peers it has not heard from.
    pub join_grace: Duration,
    /// Check kube-proxy's health on this node, and tell the others when it fails.
    pub kube_proxy_health: Option<proxy_health::Check>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            port: membership::DEFAULT_PORT,
            keyring: None,
            keyring_file: None,
            settings: membership::Settings::default(),
            hold: Duration::from_secs(3),
            join_grace: Duration::from_secs(1),
            kube_proxy_health: None,
        }
    }
}

pub struct Cluster {
    membership: Option<Membership>,
    members: watch::Receiver<Members>,
    node: String,
    started: Instant,
    /// Since when this node has been up and connected; `hold` counts from here.
    hold_from: Instant,
    opts: ClusterOptions,
    meta: NodeMeta,
    peers: Vec<(String, SocketAddr)>,
    joined: bool,
    /// Until when a node whose link came back holds off, as if joining (see
    /// [`Cluster::set_subnets`]).
    rejoining_until: Option<Instant>,
    /// The verdict of the kube-proxy health checks, when they run.
    proxy_health: Option<watch::Receiver<proxy_health::Failing>>,
    /// How long this node waits from `hold_from` before it settles: the hold-down,
    /// doubled by each recent cut-off.
    hold: Duration,
    damping: Damping,
    /// The `Members::declared_down` already acted on.
    declared_down: u64,
}

impl Cluster {
    /// Joins the speakers of the Nodes in `m`, at this node's InternalIP.
    pub async fn join(
        m: &Manifests,
        node: &str,
        subnets: Vec<IpNetwork>,
        opts: ClusterOptions,
    ) -> anyhow::Result<Cluster> {
        let all = node_addresses(m, opts.port);
        let (_, bind) = all
            .iter()
            .find(|(n, _)| n == node)
            .cloned()
            .with_context(|| format!("node {node:?} has no Node object with an InternalIP; membership needs it to bind"))?;
        let family = Family::of(bind.ip());
        let peers: Vec<(String, SocketAddr)> = all
            .into_iter()
            .filter(|(_, a)| Family::of(a.ip()) == family)
            .collect();
        let started_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let meta = NodeMeta {
            subnets,
            settled: false,
            started_at_ms,
            reported: true,
            proxy_failing: false,
        };
        let (membership, members) = Membership::start(Config {
            node_name: node.to_string(),
            bind,
            peers: peers.clone(),
            keyring: opts.keyring.clone(),
            keyring_file: opts.keyring_file.clone(),
            settings: opts.settings.clone(),
            meta: meta.clone(),
        })
        .await
        .with_context(|| format!("starting membership on {bind}"))?;
        info!(bind = %bind, peers = peers.len().saturating_sub(1), "membership started");
        let proxy_health = opts.kube_proxy_health.map(|check| {
            proxy_health::spawn(proxy_health::Options {
                address: SocketAddr::new(bind.ip(), check.port),
                interval: check.interval,
            })
        });
        Ok(Cluster {
            membership: Some(membership),
            members,
            node: node.to_string(),
            started: Instant::now(),
            hold_from: Instant::now(),
            hold: opts.hold,
            damping: Damping::new(opts.hold),
            opts,
            meta,
            peers,
            joined: false,
            rejoining_until: None,
            proxy_health,
            declared_down: 0,
        })
    }

    /// Why kube-proxy on this node fails its health check; `None`: it passes, or is not
    /// checked.
    pub fn kube_proxy_failing(&self) -> proxy_health::Failing {
        self.proxy_health.as_ref().and_then(|h| h.borrow().clone())
    }

    /// Whether kube-proxy's health is checked here.
    pub fn checks_kube_proxy(&self) -> bool {
        self.proxy_health.is_some()
    }

    /// Membership's datagram counters (none before membership started).
    pub fn stats(&self) -> Option<membership::Stats> {
        self.membership.as_ref().map(|m| m.stats())
    }

    /// Who may own IPs now. While joining: nobody (announce nothing yet).
    pub fn view(&mut self) -> ClusterView {
        let now = Instant::now();
        if let Some(healthy) = self
            .proxy_health
            .as_mut()
            .map(|h| h.borrow_and_update().is_none())
        {
            self.set_proxy_healthy(healthy);
        }
        let members = self.members.borrow_and_update().clone();
        if members.declared_down > self.declared_down {
            self.declared_down = members.declared_down;
            let declared = self.peers.iter().map(|(n, _)| n.clone()).collect();
            // One cut-off can bring several "you are down" messages (one per datagram the
            // peers received from the old identity); the ones after the first find this
            // node holding off already, so they do not double its hold.
            if self.joined && damping::cut_off(&members.seen_when_declared_down, &declared) {
                self.cut_off(now, "declared down by its peers");
                // What it thinks of the others is stale (it declared them down, too):
                // claim nothing until they are back, as after its link came back.
                self.rejoining_until = Some(now + self.opts.join_grace);
                self.publish_meta();
            }
        }
        if !self.joined {
            if !self.heard_all(&members) && now < self.started + self.opts.join_grace {
                return ClusterView {
                    members: Some(BTreeMap::new()),
                };
            }
            self.joined = true;
            // A cold start: nobody alive started more than the join grace before us, so
            // every node is starting together. All settle at once; otherwise the first to
            // reach the hold-down would briefly be the only settled node and take every
            // IP. A node rejoining a running cluster waits out the hold-down instead.
            let grace_ms = self.opts.join_grace.as_millis() as u64;
            let cold_start = !members.alive.iter().any(|(n, m)| {
                *n != self.node
                    && m.reported
                    && m.started_at_ms + grace_ms < self.meta.started_at_ms
            });
            if cold_start {
                self.meta.settled = true;
                self.publish_meta();
            }
            // Alone at join while peers are declared: they are all down, or this node
            // cannot authenticate them (a wrong key) — nothing it receives can tell,
            // since junk proves nothing. Wait one more join grace, so that a cluster
            // starting beside it owns its IPs by the time this node probes for them
            // (RFC 5227): their owners answer, and a stray node claims none. A lone
            // survivor answers after that wait.
            let alone = members.alive.keys().all(|n| *n == self.node);
            if alone && self.peers.iter().any(|(n, _)| *n != self.node) {
                self.rejoining_until = Some(now + self.opts.join_grace);
            }
            info!(
                alive = members.alive.len(),
                declared = self.peers.len(),
                cold_start,
                "joined the cluster"
            );
        }
        if let Some(until) = self.rejoining_until {
            if now >= until || self.heard_all(&members) {
                self.rejoining_until = None;
            } else {
                return ClusterView {
                    members: Some(BTreeMap::new()),
                };
            }
        }
        if !self.meta.settled && now >= self.hold_from + self.hold {
            self.meta.settled = true;
            info!(
                hold = ?self.hold,
                "settled: this node may take IPs back from others"
            );
            self.publish_meta();
        }
        let mut alive: BTreeMap<String, MemberView> = members
            .alive
            .into_iter()
            .map(|(name, meta)| {
                (
                    name,
                    MemberView {
                        subnets: meta.subnets,
                        settled: meta.settled,
                        known: meta.reported,
                        proxy_failing: meta.proxy_failing,
                    },
                )
            })
            .collect();
        // Our own entry is what we know now, not what the last gossip said.
        alive.insert(
            self.node.clone(),
            MemberView {
                subnets: self.meta.subnets.clone(),
                settled: self.meta.settled,
                known: true,
                proxy_failing: self.meta.proxy_failing,
            },
        );
        ClusterView {
            members: Some(alive),
        }
    }

    /// Whether every declared peer is alive in `members` with its metadata.
    fn heard_all(&self, members: &Members) -> bool {
        self.peers
            .iter()
            .all(|(n, _)| *n == self.node || members.alive.get(n).is_some_and(|m| m.reported))
    }

    /// When the view changes without a message: the end of the join grace, of a rejoin
    /// after the link came back, or of the hold.
    pub fn wake_at(&self) -> Option<Instant> {
        if !self.joined {
            return Some(self.started + self.opts.join_grace);
        }
        let later = (!self.meta.settled).then(|| self.hold_from + self.hold);
        match (self.rejoining_until, later) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Resolves when membership changes, or the verdict on kube-proxy's health.
    pub async fn changed(&mut self) -> anyhow::Result<()> {
        let health = async {
            match &mut self.proxy_health {
                Some(h) => h.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = self.members.changed() => changed.context("membership stopped"),
            changed = health => changed.context("the kube-proxy health checks stopped"),
        }
    }

    /// Our links changed: tell the others which subnets we can still reach. Losing one
    /// restarts our hold-down, so a flapping link never drags IPs back and forth.
    ///
    /// Gaining one back means we were the node cut off: what we think of the others is
    /// stale (while the link was down we declared them down, and they us). Alone in that
    /// view we would claim every IP at once, beside the nodes that took them over, so we
    /// hold off as a joining node does until every peer is back or `join_grace` passes.
    pub fn set_subnets(&mut self, subnets: Vec<IpNetwork>) {
        if subnets != self.meta.subnets {
            if self.meta.subnets.iter().any(|s| !subnets.contains(s)) {
                self.cut_off(Instant::now(), "its link lost a subnet");
            }
            if self.joined && subnets.iter().any(|s| !self.meta.subnets.contains(s)) {
                self.rejoining_until = Some(Instant::now() + self.opts.join_grace);
            }
            info!(
                subnets = ?subnets.iter().map(ToString::to_string).collect::<Vec<_>>(),
                settled = self.meta.settled,
                "reachable subnets changed"
            );
            self.meta.subnets = subnets;
            self.publish_meta();
        }
    }

    /// This node was cut off from the others: it takes IPs back only once it has been
    /// connected for the hold-down, doubled by each recent cut-off (`crate::damping`).
    /// A cut-off while it is still holding off (its link came back, then the peers told
    /// it that it had been down: one outage) restarts the hold without doubling it: only
    /// cut-offs that took IPs away count. The caller publishes the metadata.
    fn cut_off(&mut self, now: Instant, why: &str) {
        if self.meta.settled {
            self.hold = self.damping.cut_off(now);
        }
        self.hold_from = now;
        self.meta.settled = false;
        info!(
            why,
            recent = self.damping.recent(now),
            hold = ?self.hold,
            "cut off: this node takes IPs back only after the hold"
        );
    }

    /// Whether this node may take IPs back from others (its hold-down has passed).
    pub fn settled(&self) -> bool {
        self.meta.settled
    }

    /// How many times its peers declared this node down (each one rejoined).
    pub fn times_declared_down(&self) -> u64 {
        self.declared_down
    }

    /// How many times this node was cut off within the damping window.
    pub fn recent_cut_offs(&self) -> usize {
        self.damping.recent(Instant::now())
    }

    /// kube-proxy on this node passes its health check, or fails it: tell the others,
    /// whose elections pass over a node that fails while another passes.
    fn set_proxy_healthy(&mut self, healthy: bool) {
        if self.meta.proxy_failing == healthy {
            self.meta.proxy_failing = !healthy;
            self.publish_meta();
        }
    }

    /// The Node objects changed.
    pub fn set_peers_from(&mut self, m: &Manifests) {
        let Some(family) = self
            .peers
            .iter()
            .find(|(n, _)| *n == self.node)
            .map(|(_, a)| Family::of(a.ip()))
        else {
            return;
        };
        let peers: Vec<(String, SocketAddr)> = node_addresses(m, self.opts.port)
            .into_iter()
            .filter(|(_, a)| Family::of(a.ip()) == family)
            .collect();
        if peers != self.peers {
            self.peers = peers.clone();
            if let Some(m) = &self.membership {
                m.set_peers(peers);
            }
        }
    }

    /// Tells the others we are leaving, so they take over at once.
    pub async fn leave(&mut self) {
        if let Some(m) = self.membership.take() {
            m.leave().await;
        }
    }

    fn publish_meta(&self) {
        if let Some(m) = &self.membership
            && let Err(e) = m.set_meta(self.meta.clone())
        {
            tracing::warn!(error = %e, "cannot gossip this node's metadata");
        }
    }
}

/// Every Node's first InternalIP (IPv4 preferred) with the membership port.
fn node_addresses(m: &Manifests, port: u16) -> Vec<(String, SocketAddr)> {
    let mut out: Vec<(String, SocketAddr)> = m
        .nodes
        .iter()
        .filter_map(|n| {
            let name = n.object.metadata.name.clone()?;
            let mut ips: Vec<IpAddr> = n
                .object
                .status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect();
            ips.sort_by_key(|ip| Family::of(*ip));
            Some((name, SocketAddr::new(*ips.first()?, port)))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAN: &str = "192.0.2.0/24";

    /// node0 of three, joined, with `alive` as its membership view.
    fn node0(alive: &[&str]) -> (Cluster, watch::Sender<Members>) {
        let view = |names: &[&str]| Members {
            declared_down: 0,
            seen_when_declared_down: Default::default(),
            alive: names
                .iter()
                .map(|n| {
                    let meta = NodeMeta {
                        subnets: vec![LAN.parse().unwrap()],
                        settled: true,
                        started_at_ms: 0,
                        reported: true,
                        proxy_failing: false,
                    };
                    (n.to_string(), meta)
                })
                .collect(),
        };
        let (tx, members) = watch::channel(view(alive));
        let peers = (0..3)
            .map(|i| {
                (
                    format!("node{i}"),
                    SocketAddr::from(([192, 0, 2, 10 + i], 7947)),
                )
            })
            .collect();
        let cluster = Cluster {
            membership: None,
            members,
            node: "node0".into(),
            started: Instant::now(),
            hold_from: Instant::now(),
            opts: ClusterOptions::default(),
            meta: NodeMeta {
                subnets: vec![LAN.parse().unwrap()],
                settled: true,
                started_at_ms: 0,
                reported: true,
                proxy_failing: false,
            },
            peers,
            joined: true,
            rejoining_until: None,
            proxy_health: None,
            hold: ClusterOptions::default().hold,
            damping: Damping::new(ClusterOptions::default().hold),
            declared_down: 0,
        };
        (cluster, tx)
    }

    fn names(view: &ClusterView) -> Vec<String> {
        view.members.as_ref().unwrap().keys().cloned().collect()
    }

    #[test]
    fn alone_after_the_link_returns_it_claims_nothing_until_the_peers_are_back() {
        let (mut c, tx) = node0(&["node0", "node1", "node2"]);
        c.set_subnets(vec![]);
        c.set_subnets(vec![LAN.parse().unwrap()]);
        // While the link was down it declared the others down: alone, it waits.
        tx.send_modify(|m| m.alive.retain(|n, _| n == "node0"));
        assert!(names(&c.view()).is_empty(), "a stale view claims nothing");
        assert!(
            c.wake_at()
                .is_some_and(|at| at <= Instant::now() + c.opts.join_grace)
        );
        // The peers are back: the view is whole again, and node0 waits out its hold.
        tx.send_modify(|m| {
            for n in ["node1", "node2"] {
                let mut meta = m.alive["node0"].clone();
                meta.settled = true;
                m.alive.insert(n.into(), meta);
            }
        });
        let view = c.view();
        assert_eq!(names(&view), ["node0", "node1", "node2"]);
        assert!(!view.members.unwrap()["node0"].settled);
    }

    /// What the driver reports when the peers declare node0 down while it saw `seen`.
    fn declared_down(tx: &watch::Sender<Members>, seen: &[&str]) {
        tx.send_modify(|m| {
            m.declared_down += 1;
            m.seen_when_declared_down = seen.iter().map(|n| n.to_string()).collect();
        });
    }

    fn settled(c: &mut Cluster) -> bool {
        c.view().members.unwrap()["node0"].settled
    }

    #[test]
    fn declared_down_on_the_small_side_it_waits_longer_each_time() {
        let (mut c, tx) = node0(&["node0", "node1", "node2"]);
        let hold = c.opts.hold;
        declared_down(&tx, &["node0"]);
        assert!(
            !settled(&mut c),
            "cut off, it does not take IPs back at once"
        );
        let first = c.wake_at().unwrap();
        assert!(
            first > Instant::now() + hold - Duration::from_millis(500)
                && first <= Instant::now() + hold
        );
        // The same cut-off told twice counts once…
        declared_down(&tx, &["node0"]);
        assert!(!settled(&mut c));
        assert_eq!(c.recent_cut_offs(), 1);
        // Settled again, it is cut off again: twice the hold, from now.
        c.hold_from = Instant::now() - hold;
        assert!(settled(&mut c));
        declared_down(&tx, &["node0"]);
        assert!(!settled(&mut c));
        assert!(c.wake_at().unwrap() > Instant::now() + hold * 2 - Duration::from_millis(500));
        assert_eq!(c.recent_cut_offs(), 2);
        // Cut off again while still holding off (one outage, told twice): the hold
        // starts again, not doubled.
        c.set_subnets(vec![]);
        assert_eq!(c.recent_cut_offs(), 2);
        assert!(c.wake_at().unwrap() > Instant::now() + hold * 2 - Duration::from_millis(500));
        assert!(c.wake_at().unwrap() <= Instant::now() + hold * 2);
        // Settled, its link losing a subnet counts the same as being declared down.
        c.hold_from = Instant::now() - hold * 2;
        assert!(settled(&mut c));
        c.set_subnets(vec![LAN.parse().unwrap()]);
        c.set_subnets(vec![]);
        assert_eq!(c.recent_cut_offs(), 3);
        assert_eq!(c.hold, hold * 4);
    }

    #[test]
    fn declared_down_on_the_large_side_of_a_partition_it_keeps_its_ips() {
        let (mut c, tx) = node0(&["node0", "node1", "node2"]);
        declared_down(&tx, &["node0", "node1"]);
        assert!(
            settled(&mut c),
            "the side that saw more nodes stays settled"
        );
        assert_eq!(c.recent_cut_offs(), 0);
        assert_eq!(c.wake_at(), None);
        // Declared down while seeing everyone: its own datagrams were lost.
        declared_down(&tx, &["node0", "node1", "node2"]);
        assert!(!settled(&mut c));
    }

    #[test]
    fn a_last_survivor_whose_link_never_went_down_takes_over_at_once() {
        let (mut c, tx) = node0(&["node0", "node1", "node2"]);
        tx.send_modify(|m| m.alive.retain(|n, _| n == "node0"));
        assert_eq!(names(&c.view()), ["node0"]);
    }
}
