//! The membership loop: feeds foca datagrams, timers and commands, sends what it asks to
//! send, and publishes the live members.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec};
use rand::rngs::StdRng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// A node declared down asks whom it saw this long before: what it saw while cut off,
/// not the renewals the heal itself brings (a peer told it is down renews its identity,
/// so its old one leaves the views for a few microseconds, on both sides).
const SEEN_BEFORE: Duration = Duration::from_millis(50);
/// How many changes of the members are remembered for that (the newest).
const MAX_RECENT_VIEWS: usize = 64;

use super::Settings;
use super::freshness::{Freshness, Verdict};
use super::identity::NodeId;
use super::metadata::{MetaHandler, MetaTable, encode_meta};
use super::sealing::{Header, Keyring, MAX_DATAGRAM, Rejected, name_hash, peek, seal};
use super::timers::{Scheduled, sleep_until};
use super::{Command, Counters, Members, NodeMeta};

/// Datagrams received per wake-up at most, before timers and commands get a turn.
const RECV_BATCH: usize = 256;
/// How often at most a rejected datagram is logged at error.
const REJECT_LOG_EVERY: Duration = Duration::from_secs(10);
/// Authenticated datagrams a sender may send us per second, sustained (a steady
/// cluster sends a few tens), and in a burst.
const SENDER_RATE: f64 = 1000.0;
const SENDER_BURST: f64 = 2000.0;
/// How often the keyring file is read again, so a rotated Secret takes effect without
/// a restart (the kubelet updates a mounted Secret within a minute or so).
pub(super) const KEYRING_RELOAD_EVERY: Duration = Duration::from_secs(5);

pub(super) type Swim = Foca<NodeId, PostcardCodec, StdRng, MetaHandler>;

/// Where the keyring comes from, and what it said last.
pub(super) struct KeyringFile {
    pub(super) path: PathBuf,
    pub(super) contents: Vec<u8>,
}

/// A sender's allowance of datagrams (token bucket).
struct Allowance {
    tokens: f64,
    at: Instant,
}

/// The membership task: owns foca, the socket and the timers, on a thread of its own.
pub(super) struct Driver {
    pub(super) foca: Swim,
    pub(super) runtime: AccumulatingRuntime<NodeId>,
    pub(super) socket: UdpSocket,
    pub(super) keyring: Option<Keyring>,
    pub(super) keyring_file: Option<KeyringFile>,
    pub(super) timers: BinaryHeap<Reverse<Scheduled>>,
    pub(super) timer_seq: u64,
    /// Configured peers other than ourselves.
    pub(super) peers: Vec<(String, SocketAddr)>,
    pub(super) name: String,
    /// This process's random incarnation: our identity's epoch, and what our datagrams
    /// are numbered under.
    pub(super) epoch: u64,
    /// Datagrams sent by this process.
    pub(super) sent: u64,
    pub(super) freshness: Freshness,
    /// The newest identity (bump, epoch) seen per member name, told to that name in
    /// every datagram sent to it (see [`Header::floor`]).
    pub(super) floors: HashMap<String, (u64, u64)>,
    allowances: HashMap<u64, Allowance>,
    /// Our name as datagram headers carry it.
    name_hash: u64,
    pub(super) meta_version: u64,
    pub(super) meta: NodeMeta,
    pub(super) metas: Arc<Mutex<MetaTable>>,
    /// Set by the metadata handler when something new arrived.
    pub(super) metas_changed: Arc<AtomicBool>,
    /// The members must be published again (foca reported a change, or metadata).
    members_dirty: bool,
    /// Times we were declared down, and whom we saw alive the last time.
    declared_down: u64,
    seen_when_declared_down: BTreeSet<String>,
    /// The members we saw, each change with its time, oldest first.
    recent_views: VecDeque<(Instant, BTreeSet<String>)>,
    pub(super) members: watch::Sender<Members>,
    pub(super) counters: Arc<Counters>,
    last_reject_log: Option<Instant>,
    /// The failure-detection tuning; its transmissions follow the number of peers.
    pub(super) settings: Settings,
}

impl Driver {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        foca: Swim,
        socket: UdpSocket,
        keyring: Option<Keyring>,
        keyring_file: Option<KeyringFile>,
        name: String,
        epoch: u64,
        meta: NodeMeta,
        metas: Arc<Mutex<MetaTable>>,
        metas_changed: Arc<AtomicBool>,
        members: watch::Sender<Members>,
        counters: Arc<Counters>,
        settings: Settings,
    ) -> Driver {
        Driver {
            foca,
            runtime: AccumulatingRuntime::new(),
            socket,
            keyring,
            keyring_file,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            peers: Vec::new(),
            epoch,
            sent: 0,
            freshness: Freshness::default(),
            floors: HashMap::new(),
            allowances: HashMap::new(),
            name_hash: name_hash(&name),
            name,
            meta_version: 0,
            meta,
            metas,
            metas_changed,
            members_dirty: true,
            declared_down: 0,
            seen_when_declared_down: BTreeSet::new(),
            recent_views: VecDeque::new(),
            members,
            counters,
            last_reject_log: None,
            settings,
        }
    }

    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; 2 * MAX_DATAGRAM];
        let mut rejoin = tokio::time::interval(self.settings.rejoin_interval);
        rejoin.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reload = tokio::time::interval(KEYRING_RELOAD_EVERY);
        reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next_timer = self.timers.peek().map(|Reverse(s)| s.at);
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::SetPeers(peers)) => {
                        self.set_peers(peers);
                        self.announce_to_missing();
                    }
                    Some(Command::SetMeta(meta)) => {
                        self.meta = meta;
                        self.members_dirty = true;
                        self.publish_meta(true);
                    }
                    Some(Command::Leave(done)) => {
                        let result = self.foca.leave_cluster(&mut self.runtime);
                        self.check(result, "leaving");
                        self.flush().await;
                        let _ = done.send(());
                        return;
                    }
                    // The handle is gone (dropped): stop like a crash.
                    None => return,
                },
                ready = self.socket.readable() => {
                    if let Err(error) = ready {
                        tracing::debug!(%error, "membership receive failed");
                    }
                    // Junk, forgeries, replays and floods stop in `receive`, before any
                    // work: no foca, no flush, no members rebuilt. Draining a batch per
                    // wake-up keeps up with a flood, so the socket's queue does not
                    // overflow and drop the peers' probes with the junk.
                    if !self.drain(&mut buf) {
                        continue;
                    }
                }
                () = sleep_until(next_timer) => self.fire_due_timers(),
                _ = rejoin.tick() => self.announce_to_missing(),
                _ = reload.tick() => self.reload_keyring(),
            }
            self.flush().await;
        }
    }

    pub(super) fn set_peers(&mut self, mut peers: Vec<(String, SocketAddr)>) {
        peers.retain(|(name, _)| *name != self.name);
        peers.sort();
        peers.dedup();
        self.peers = peers;
        // Every update must reach every member by gossip: in a larger cluster each is
        // passed on more times (see `Settings::transmissions_for`).
        let config = self.settings.foca_config(self.peers.len() + 1);
        match config {
            Ok(config) => {
                let result = self.foca.set_config(config);
                self.check(result, "resizing gossip to the cluster");
            }
            Err(error) => tracing::warn!("{error:#}"),
        }
    }

    /// Queues our metadata under a new version (so that every member, including ones
    /// that already have an older version, takes it) and, when `now`, pushes it out
    /// at once rather than with the next messages.
    pub(super) fn publish_meta(&mut self, now: bool) {
        self.meta_version += 1;
        match encode_meta(&self.name, self.epoch, self.meta_version, &self.meta) {
            Ok(data) => {
                let result = self.foca.add_broadcast(&data).map(|_| ());
                self.check(result, "queueing our metadata");
            }
            Err(error) => tracing::warn!("{error:#}"),
        }
        if now {
            let result = self.foca.broadcast(&mut self.runtime);
            self.check(result, "gossiping our metadata");
        }
    }

    /// Announces ourselves to every configured peer that is not a live member: how we
    /// join, rejoin after a partition, and find peers that restarted.
    fn announce_to_missing(&mut self) {
        let live: Vec<String> = self
            .foca
            .iter_members()
            .map(|m| m.id().name.clone())
            .collect();
        let missing: Vec<NodeId> = self
            .peers
            .iter()
            .filter(|(name, _)| !live.contains(name))
            .map(|(name, addr)| NodeId {
                name: name.clone(),
                addr: *addr,
                // Announcements are accepted by name, whatever the bump.
                bump: 0,
                epoch: 0,
            })
            .collect();
        for peer in missing {
            let result = self.foca.announce(peer, &mut self.runtime);
            self.check(result, "announcing");
        }
    }

    /// Receives what is queued, up to [`RECV_BATCH`] datagrams; whether foca got any.
    fn drain(&mut self, buf: &mut [u8]) -> bool {
        let mut fed = false;
        for _ in 0..RECV_BATCH {
            match self.socket.try_recv_from(buf) {
                Ok((len, from)) => fed |= self.receive(&buf[..len], from),
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(error) => {
                    tracing::debug!(%error, "membership receive failed");
                    break;
                }
            }
        }
        fed
    }

    /// Checks a datagram, cheapest first, and hands it to foca when it is authentic,
    /// fresh and within its sender's allowance. Returns whether foca got it.
    fn receive(&mut self, frame: &[u8], from: SocketAddr) -> bool {
        let rejected = |driver: &mut Driver, why: Rejected| {
            driver.counters.rejected.fetch_add(1, Ordering::Relaxed);
            driver.log_rejected(from, frame.len(), why);
            false
        };
        let unopened = match peek(self.keyring.as_ref(), frame) {
            Ok(unopened) => unopened,
            Err(why) => return rejected(self, why),
        };
        let header = unopened.header.clone();
        let replayed = |driver: &mut Driver, verdict: Verdict| {
            driver.counters.replayed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, ?verdict, "membership: replayed, stale or misdirected datagram dropped");
            false
        };
        if header.sender == self.name_hash || header.destination != self.name_hash {
            // Ours, or meant for another node (replayed to us): nothing for us.
            return replayed(self, Verdict::Duplicate);
        }
        // Before the tag: a replay costs no cryptography.
        let verdict = self
            .freshness
            .verdict(header.sender, header.incarnation, header.counter);
        if verdict != Verdict::Fresh {
            return replayed(self, verdict);
        }
        let message = match unopened.open() {
            Ok(message) => message,
            Err(why) => return rejected(self, why),
        };
        // Authentic: now it may move the window.
        self.freshness
            .accept(header.sender, header.incarnation, header.counter);
        if !self.within_allowance(header.sender) {
            self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        self.outbid(header.floor);
        let result = self.foca.handle_data(&message, &mut self.runtime);
        self.check(result, "handling a message");
        true
    }

    fn log_rejected(&mut self, from: SocketAddr, len: usize, why: Rejected) {
        tracing::debug!(%from, len, ?why, "membership datagram rejected");
        let now = Instant::now();
        if self
            .last_reject_log
            .is_none_or(|last| now.duration_since(last) >= REJECT_LOG_EVERY)
        {
            self.last_reject_log = Some(now);
            let rejected = self.counters.rejected.load(Ordering::Relaxed);
            let keys = self.keyring.as_ref().map(Keyring::ids).unwrap_or_default();
            tracing::error!(
                source = %from,
                ?why,
                rejected_total = rejected,
                keys = ?keys,
                "membership datagrams this node cannot authenticate keep arriving (the \
                 latest from {from}): a speaker with a wrong or missing \
                 --memberlist-secret-file, or junk; they are ignored, and a speaker that \
                 cannot authenticate its peers acts as if cut off from them"
            );
        }
    }

    /// Whether `sender` may send one more datagram now (token bucket per sender).
    fn within_allowance(&mut self, sender: u64) -> bool {
        let now = Instant::now();
        if !self.allowances.contains_key(&sender) {
            if self.allowances.len() >= 4096 {
                self.allowances
                    .retain(|_, a| now.duration_since(a.at) < Duration::from_secs(60));
            }
            self.allowances.insert(
                sender,
                Allowance {
                    tokens: SENDER_BURST,
                    at: now,
                },
            );
        }
        let Some(allowance) = self.allowances.get_mut(&sender) else {
            return false;
        };
        let refill = now.duration_since(allowance.at).as_secs_f64() * SENDER_RATE;
        allowance.tokens = (allowance.tokens + refill).min(SENDER_BURST);
        allowance.at = now;
        if allowance.tokens >= 1.0 {
            allowance.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A peer knows an identity of our name that wins over ours: a previous process of
    /// this node whose identity was renewed, or whose tie-break was luckier. Outbid it,
    /// so that we are admitted now rather than when the peers forget it.
    fn outbid(&mut self, floor: (u64, u64)) {
        let ours = self.foca.identity().clone();
        if floor.1 == self.epoch || floor <= (ours.bump, ours.epoch) {
            return;
        }
        let renewed = NodeId {
            bump: floor.0.saturating_add(1),
            ..ours
        };
        tracing::info!(
            bump = renewed.bump,
            "membership: a previous process of this node is still known; outbidding it"
        );
        let result = self.foca.change_identity(renewed, &mut self.runtime);
        self.check(result, "outbidding a previous identity");
        self.announce_to_missing();
    }

    /// Reads the keyring file again; a changed, valid keyring replaces ours. A file
    /// that cannot be read or parsed keeps the keys we have (logged).
    fn reload_keyring(&mut self) {
        let Some(file) = &mut self.keyring_file else {
            return;
        };
        let contents = match std::fs::read(&file.path) {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(path = %file.path.display(), %error, "membership keyring unreadable; keeping the current keys");
                return;
            }
        };
        if contents == file.contents {
            return;
        }
        match Keyring::parse(&contents) {
            Ok(keyring) => {
                file.contents = contents;
                tracing::info!(path = %file.path.display(), keys = ?keyring.ids(), "membership keyring reloaded; the first key sends");
                self.keyring = Some(keyring);
            }
            Err(error) => {
                file.contents = contents;
                tracing::error!(path = %file.path.display(), "membership keyring: {error:#}; keeping the current keys");
            }
        }
    }

    pub(super) fn check(&self, result: Result<(), foca::Error>, doing: &str) {
        if let Err(error) = result {
            // Foca tolerates garbage and races (messages from ourselves, from members
            // it just declared down); nothing here needs more than a debug line.
            tracing::debug!(%error, "membership: {doing}");
        }
    }

    /// Does what foca asked for: sends, timers, notifications; then publishes members.
    async fn flush(&mut self) {
        loop {
            self.schedule();
            let mut republish_meta = false;
            let mut announce = false;
            while let Some(notification) = self.runtime.to_notify() {
                self.members_dirty = true;
                match notification {
                    // Someone new (or back): it needs our metadata.
                    OwnedNotification::MemberUp(id) => {
                        self.raise_floor(&id);
                        republish_meta = true;
                    }
                    OwnedNotification::Rename(old, new) => {
                        self.raise_floor(&old);
                        self.raise_floor(&new);
                        republish_meta = true;
                    }
                    OwnedNotification::MemberDown(id) => self.raise_floor(&id),
                    // We were declared down (a partition healed): foca renewed our
                    // identity; tell the peers now rather than at the next rejoin tick.
                    OwnedNotification::Rejoin(id) => {
                        self.declared_down += 1;
                        self.seen_when_declared_down = self.seen_before_the_heal();
                        tracing::info!(
                            bump = id.bump,
                            seen = ?self.seen_when_declared_down,
                            "membership: declared down by peers, rejoining"
                        );
                        republish_meta = true;
                        announce = true;
                    }
                    OwnedNotification::Defunct => {
                        tracing::warn!("membership: declared down and cannot rejoin");
                    }
                    other => tracing::debug!(notification = ?other, "membership"),
                }
            }
            if republish_meta {
                self.publish_meta(false);
            }
            if announce {
                self.announce_to_missing();
            }
            self.schedule();
            while let Some((to, message)) = self.runtime.to_send() {
                self.sent += 1;
                let header = Header {
                    sender: self.name_hash,
                    destination: name_hash(&to.name),
                    incarnation: self.epoch,
                    counter: self.sent,
                    floor: self.floors.get(&to.name).copied().unwrap_or_default(),
                };
                let Some(frame) = seal(self.keyring.as_ref(), &header, &message) else {
                    tracing::warn!("membership: no randomness for a nonce, dropping a message");
                    continue;
                };
                match self.socket.send_to(&frame, to.addr).await {
                    Ok(_) => {
                        self.counters.sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => tracing::debug!(%error, to = %to.addr, "membership send failed"),
                }
            }
            if self.runtime.backlog() == 0 {
                break;
            }
        }
        if self.metas_changed.swap(false, Ordering::Relaxed) {
            self.members_dirty = true;
        }
        if self.members_dirty {
            self.members_dirty = false;
            self.publish_members();
        }
    }

    /// The members we saw alive [`SEEN_BEFORE`] ago, ourselves included: which side of
    /// a cut we were on.
    fn seen_before_the_heal(&self) -> BTreeSet<String> {
        let then = Instant::now().checked_sub(SEEN_BEFORE);
        self.recent_views
            .iter()
            .rev()
            .find(|(at, _)| then.is_some_and(|then| *at <= then))
            .or(self.recent_views.front())
            .map(|(_, seen)| seen.clone())
            .unwrap_or_else(|| [self.name.clone()].into())
    }

    /// Remembers `id` as the newest identity of its name, if it is.
    fn raise_floor(&mut self, id: &NodeId) {
        let seen = (id.bump, id.epoch);
        let floor = self.floors.entry(id.name.clone()).or_default();
        if seen > *floor {
            *floor = seen;
        }
    }

    /// Rebuilds the members map: O(members), so only when foca or the metadata said
    /// something changed, never per datagram.
    fn publish_members(&mut self) {
        let metas = self.metas.lock().unwrap_or_else(|e| e.into_inner());
        let mut alive: BTreeMap<String, NodeMeta> = self
            .foca
            .iter_members()
            .map(|m| {
                let id = m.id();
                // A restarted node's old metadata (settled, say) must not stand for the
                // new process: until its own arrives, the member is "not reported".
                let meta = metas.get(&id.name).and_then(|processes| {
                    processes
                        .iter()
                        .find(|(epoch, _, _)| *epoch == id.epoch)
                        .map(|(_, _, meta)| meta.clone())
                });
                (id.name.clone(), meta.unwrap_or_default())
            })
            .collect();
        drop(metas);
        alive.insert(self.name.clone(), self.meta.clone());
        let names: BTreeSet<String> = alive.keys().cloned().collect();
        if self
            .recent_views
            .back()
            .is_none_or(|(_, last)| *last != names)
        {
            // Bounded however fast members come and go: the oldest views go first.
            if self.recent_views.len() >= MAX_RECENT_VIEWS {
                self.recent_views.pop_front();
            }
            self.recent_views.push_back((Instant::now(), names));
        }
        let now = Members {
            alive,
            declared_down: self.declared_down,
            seen_when_declared_down: self.seen_when_declared_down.clone(),
        };
        self.members.send_if_modified(|members| {
            if *members == now {
                false
            } else {
                *members = now;
                true
            }
        });
    }
}
