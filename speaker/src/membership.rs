//! Which speakers are alive, learned over UDP with SWIM ([foca]).
//!
//! Every speaker runs one [`Membership`]: a thread of its own, with a single-threaded
//! tokio runtime (so a busy speaker still answers probes on time), owning one UDP socket
//! (default port [`DEFAULT_PORT`]) and driving a sans-IO foca instance — feeding it
//! datagrams and timer events, sending what it asks to send — and publishing the live
//! members, each with the [`NodeMeta`] it gossips about itself, on a [`watch`] channel.
//!
//! * Peers come from the Node objects ([`Config::peers`]); the task announces itself to
//!   every configured peer that is not a live member, so a cluster forms from any
//!   order of starts and heals after a partition without outside help.
//! * A restarted speaker (same name and address) has a newer identity (a larger `bump`)
//!   and is admitted at once; one that the others declared down (a cut link) renews its
//!   identity and rejoins when it can talk again.
//! * With a shared secret every datagram is sealed with ChaCha20-Poly1305; datagrams that
//!   fail to open — wrong secret, no secret, or sealed traffic reaching a node without
//!   one — are dropped and counted, so nodes with different secrets never admit each
//!   other.
//! * Traffic is per node, never per announced IP: a probe and an ack per
//!   [`Settings::probe_period`] in steady state, whatever the number of Services.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use foca::{AccumulatingRuntime, Foca, Invalidates, OwnedNotification, PostcardCodec, Timer};
use ipnetwork::IpNetwork;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// The UDP port speakers use for membership unless configured otherwise (memberlist's).
pub const DEFAULT_PORT: u16 = 7946;

/// Largest datagram we send: below any Ethernet MTU, so never fragmented.
const MAX_DATAGRAM: usize = 1400;
/// Frame overhead when sealed: kind byte, nonce, Poly1305 tag.
const SEALED_OVERHEAD: usize = 1 + 12 + 16;
/// What foca may put in one datagram.
const MAX_FOCA_PACKET: usize = MAX_DATAGRAM - SEALED_OVERHEAD;
/// Our own [`NodeMeta`] must fit in a datagram next to foca's header and updates.
const MAX_META_BYTES: usize = 900;
/// First byte of every datagram: plain foca message.
const KIND_PLAIN: u8 = 1;
/// First byte of every datagram: sealed with the shared secret.
const KIND_SEALED: u8 = 2;
/// How often at most a failed authentication is logged at warn.
const AUTH_WARN_EVERY: Duration = Duration::from_secs(10);

/// Failure-detection tuning.
///
/// A crashed node is declared down after, roughly, the wait until a survivor next probes
/// it (up to `probe_period` × members ÷ survivors, one period on average in a small
/// cluster), plus one `probe_period` (the failed probe), plus `suspect_to_down`.
/// The defaults aim at sub-second failover on a LAN: measured over real UDP between
/// network namespaces, 3 nodes, a killed member is declared down by both others in
/// about 190 ms (median; max about 260 ms), for about 40 packets/s sent per node. A
/// 100 ms period would put the median near 270 ms, leaving no room in a 300 ms
/// failover budget.
///
/// The trade-off: shorter periods detect failures faster but cost more packets (one
/// probe and one ack per `probe_period` per node), and a shorter `probe_rtt` or
/// `suspect_to_down` raises false suspicions when a node is loaded (a stalled process
/// misses its deadline) or the network drops packets; a suspicion not refuted within
/// `suspect_to_down` moves that node's IPs. On busy or lossy networks double them all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// How often each node probes one other member.
    pub probe_period: Duration,
    /// How long a direct probe may take before asking others to probe indirectly; must
    /// be shorter than `probe_period` (leave room for the indirect round trip).
    pub probe_rtt: Duration,
    /// How long a suspected member has to refute the suspicion before it is declared
    /// down.
    pub suspect_to_down: Duration,
    /// How many members are asked to probe a silent member on our behalf.
    pub indirect_probes: usize,
    /// How often pending membership updates are pushed to others rather than waiting
    /// for the next probe (only sent when there are updates).
    pub gossip_period: Duration,
    /// How many times each update is passed on.
    pub max_transmissions: u8,
    /// How often we announce ourselves to configured peers that are not live members
    /// (joining, healing a partition, a peer that restarted elsewhere).
    pub rejoin_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_millis(50),
            probe_rtt: Duration::from_millis(20),
            suspect_to_down: Duration::from_millis(100),
            indirect_probes: 3,
            gossip_period: Duration::from_millis(20),
            max_transmissions: 6,
            rejoin_interval: Duration::from_millis(250),
        }
    }
}

impl Settings {
    fn foca_config(&self) -> anyhow::Result<foca::Config> {
        ensure!(
            !self.probe_rtt.is_zero() && self.probe_rtt < self.probe_period,
            "membership probe RTT ({:?}) must be above zero and below the probe period ({:?})",
            self.probe_rtt,
            self.probe_period
        );
        ensure!(
            !self.suspect_to_down.is_zero()
                && !self.gossip_period.is_zero()
                && !self.rejoin_interval.is_zero(),
            "membership suspicion timeout, gossip period and rejoin interval must be above zero"
        );
        let mut config = foca::Config::simple();
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.suspect_to_down_after = self.suspect_to_down;
        config.num_indirect_probes = NonZeroUsize::new(self.indirect_probes)
            .context("indirect probes must be at least 1")?;
        config.max_transmissions = NonZeroU8::new(self.max_transmissions)
            .context("max transmissions must be at least 1")?;
        config.max_packet_size = NonZeroUsize::new(MAX_FOCA_PACKET).context("packet size")?;
        // A node we declared down learns it and rejoins under a renewed identity.
        config.notify_down_members = true;
        // Discover members we were not told about (foca's LAN default).
        config.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(30),
            num_members: NonZeroUsize::MIN,
        });
        // Down peers are re-announced to by our own rejoin loop, which also runs when we
        // are alone (foca's only runs while connected).
        config.periodic_announce_to_down_members = None;
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.gossip_period,
            num_members: config.num_indirect_probes,
        });
        Ok(config)
    }
}

/// How to run this node's membership.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name (the Node object's): how the others know us.
    pub node_name: String,
    /// This node's InternalIP and the membership port; peers send here.
    pub bind: SocketAddr,
    /// Every node's name and membership address (may include ourselves: ignored).
    pub peers: Vec<(String, SocketAddr)>,
    /// Shared secret (the contents of `--memberlist-secret-file`); `None` sends plain
    /// messages.
    pub secret: Option<Vec<u8>>,
    /// Failure-detection tuning.
    pub settings: Settings,
    /// What we tell the others about ourselves at start.
    pub meta: NodeMeta,
}

/// What a node tells the others about itself (small; gossiped on change).
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Subnets of the node's usable links: the election only picks a node that can reach
    /// an IP's segment.
    pub subnets: Vec<IpNetwork>,
    /// Up for longer than the rejoin hold-down (see `crate::cluster`).
    pub settled: bool,
    /// When the node's speaker started (Unix milliseconds), to tell a cold start (every
    /// node starting together) from one node rejoining a running cluster.
    pub started_at_ms: u64,
    /// True in every NodeMeta a node sends; false in the default shown for a member
    /// whose metadata has not arrived yet, so that "unknown" is not read as "no subnets".
    pub reported: bool,
}

/// The live members as this node sees them.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Members {
    /// Node name to its metadata, ourselves included. Suspected members still count
    /// (SWIM): only members declared down leave. A member whose metadata has not
    /// arrived yet shows the default (no subnets) for a few milliseconds.
    pub alive: BTreeMap<String, NodeMeta>,
}

/// Datagram counters since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams received that were accepted (authenticated when a secret is set).
    pub received: u64,
    /// Datagrams dropped because they failed authentication or had the wrong framing.
    pub rejected: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    rejected: AtomicU64,
}

enum Command {
    SetPeers(Vec<(String, SocketAddr)>),
    SetMeta(NodeMeta),
    Leave(oneshot::Sender<()>),
}

/// Handle to the running membership task. Dropping it stops the task abruptly, without
/// telling the others (they detect it like a crash); [`Membership::leave`] is the
/// graceful way.
pub struct Membership {
    commands: mpsc::UnboundedSender<Command>,
    counters: Arc<Counters>,
    /// Ends when `commands` is dropped (like a crash) or after a leave.
    _thread: std::thread::JoinHandle<()>,
}

impl Membership {
    /// Binds `config.bind` and starts the membership task on a thread of its own,
    /// announcing ourselves to every peer. The receiver sees the live members (at first
    /// only ourselves).
    pub async fn start(config: Config) -> anyhow::Result<(Membership, watch::Receiver<Members>)> {
        let foca_config = config.settings.foca_config()?;
        ensure!(
            !config.bind.ip().is_unspecified(),
            "membership must bind this node's own address (peers send to it), not {}",
            config.bind
        );
        encode_meta(&config.node_name, 0, 0, &config.meta)?;
        let socket = std::net::UdpSocket::bind(config.bind)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .with_context(|| format!("binding membership socket {}", config.bind))?;
        let epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let identity = NodeId {
            name: config.node_name.clone(),
            addr: config.bind,
            bump: epoch,
            epoch,
        };
        let metas = Arc::new(Mutex::new(HashMap::new()));
        let handler = MetaHandler {
            metas: Arc::clone(&metas),
        };
        let foca = Foca::with_custom_broadcast(
            identity,
            foca_config,
            rand::make_rng::<StdRng>(),
            PostcardCodec,
            handler,
        );
        let mut alive = BTreeMap::new();
        alive.insert(config.node_name.clone(), config.meta.clone());
        let (members_tx, members_rx) = watch::channel(Members { alive });
        let counters = Arc::new(Counters::default());
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let rejoin_interval = config.settings.rejoin_interval;
        let driver_counters = Arc::clone(&counters);
        let driver = move |socket| Driver {
            foca,
            runtime: AccumulatingRuntime::new(),
            socket,
            cipher: config.secret.as_deref().map(cipher_for),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            peers: Vec::new(),
            name: config.node_name,
            epoch,
            meta_version: 0,
            meta: config.meta,
            metas,
            members: members_tx,
            counters: driver_counters,
            last_auth_warn: None,
            rejoin_interval,
        };
        let peers = config.peers;
        // A thread and runtime of its own: however long planning 10,000 Services or
        // writing their status keeps the speaker's runtime busy, probes are answered on
        // time, so a busy node is never taken for a dead one.
        let (started, starting) = oneshot::channel::<anyhow::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("membership".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = started.send(Err(anyhow::anyhow!("starting its runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let socket = match UdpSocket::from_std(socket) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = started.send(Err(anyhow::anyhow!("using its socket: {e}")));
                            return;
                        }
                    };
                    let mut driver = driver(socket);
                    driver.set_peers(peers);
                    driver.publish_meta(false);
                    let _ = started.send(Ok(()));
                    driver.run(commands_rx).await;
                });
            })
            .context("starting the membership thread")?;
        // Failing here, not later: a speaker that believed itself alone would claim every IP.
        starting
            .await
            .context("the membership thread ended at start")?
            .context("membership")?;
        Ok((
            Membership {
                commands,
                counters,
                _thread: thread,
            },
            members_rx,
        ))
    }

    /// The Node objects changed: these are now all the peers.
    pub fn set_peers(&self, peers: Vec<(String, SocketAddr)>) {
        // A send error means the task has ended; there is nobody left to tell.
        let _ = self.commands.send(Command::SetPeers(peers));
    }

    /// Our links changed: gossip the new metadata at once.
    ///
    /// Fails (keeping the previous metadata) when it is too large to gossip, or when
    /// the task has stopped.
    pub fn set_meta(&self, meta: NodeMeta) -> anyhow::Result<()> {
        encode_meta("", 0, 0, &meta)?;
        self.commands
            .send(Command::SetMeta(meta))
            .map_err(|_| anyhow::anyhow!("membership task has stopped"))
    }

    /// Datagram counters since start.
    pub fn stats(&self) -> Stats {
        Stats {
            sent: self.counters.sent.load(Ordering::Relaxed),
            received: self.counters.received.load(Ordering::Relaxed),
            rejected: self.counters.rejected.load(Ordering::Relaxed),
        }
    }

    /// Tells the others we are leaving (they drop us at once rather than after a
    /// detection period), then stops.
    pub async fn leave(self) {
        let (done, wait) = oneshot::channel();
        if self.commands.send(Command::Leave(done)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), wait).await;
        }
    }
}

/// A member's identity in foca. `bump` makes a restarted or renewed node a newer
/// identity for the same name, which wins over the old one, so it is admitted at once.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
struct NodeId {
    name: String,
    addr: SocketAddr,
    bump: u64,
    /// The process's start (what its metadata is versioned by); unchanged by renewals.
    /// Metadata of an older process is not this member's.
    epoch: u64,
}

impl foca::Identity for NodeId {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            name: self.name.clone(),
            addr: self.addr,
            bump: self.bump.wrapping_add(1),
            epoch: self.epoch,
        })
    }

    fn addr(&self) -> String {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// A node's metadata as gossiped: versioned by (epoch, version) so that a newer one
/// replaces an older one, and a restarted node (larger epoch) replaces what its
/// previous process said.
#[derive(Serialize, Deserialize)]
struct MetaUpdate {
    name: String,
    epoch: u64,
    version: u64,
    meta: NodeMeta,
}

fn encode_meta(name: &str, epoch: u64, version: u64, meta: &NodeMeta) -> anyhow::Result<Vec<u8>> {
    let update = MetaUpdate {
        name: name.to_owned(),
        epoch,
        version,
        meta: meta.clone(),
    };
    let bytes = postcard::to_allocvec(&update).context("encoding node metadata")?;
    // Names are at most 253 bytes; checking the worst case keeps set_meta honest.
    if bytes.len() + 253usize.saturating_sub(name.len()) > MAX_META_BYTES {
        bail!(
            "node metadata too large to gossip ({} subnets)",
            meta.subnets.len()
        );
    }
    Ok(bytes)
}

struct MetaKey {
    name: String,
    epoch: u64,
    version: u64,
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.name == other.name && (self.epoch, self.version) >= (other.epoch, other.version)
    }
}

/// Newest metadata per node name, with its (epoch, version).
type MetaTable = HashMap<String, (u64, u64, NodeMeta)>;

/// Keeps the newest metadata per node; foca passes on only what is new to us.
struct MetaHandler {
    metas: Arc<Mutex<MetaTable>>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad node metadata: {0}")]
struct BadMeta(#[from] postcard::Error);

impl foca::BroadcastHandler<NodeId> for MetaHandler {
    type Key = MetaKey;
    type Error = BadMeta;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeId>,
    ) -> Result<Option<MetaKey>, BadMeta> {
        let update: MetaUpdate = postcard::from_bytes(data)?;
        let mut metas = self.metas.lock().unwrap_or_else(|e| e.into_inner());
        let newer = metas
            .get(&update.name)
            .is_none_or(|(epoch, version, _)| (update.epoch, update.version) > (*epoch, *version));
        if !newer {
            return Ok(None);
        }
        metas.insert(
            update.name.clone(),
            (update.epoch, update.version, update.meta),
        );
        Ok(Some(MetaKey {
            name: update.name,
            epoch: update.epoch,
            version: update.version,
        }))
    }
}

fn cipher_for(secret: &[u8]) -> ChaCha20Poly1305 {
    let mut hash = Sha256::new();
    hash.update(b"ferrolb membership v1\0");
    hash.update(secret);
    let key: [u8; 32] = hash.finalize().into();
    ChaCha20Poly1305::new(&Key::from(key))
}

/// Frames a foca message for the wire: sealed with a fresh random nonce when there is a
/// secret. `None` only if the system RNG fails.
fn seal(cipher: Option<&ChaCha20Poly1305>, message: &[u8]) -> Option<Vec<u8>> {
    let Some(cipher) = cipher else {
        let mut frame = Vec::with_capacity(message.len() + 1);
        frame.push(KIND_PLAIN);
        frame.extend_from_slice(message);
        return Some(frame);
    };
    let nonce = Nonce::try_generate().ok()?;
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: message,
                aad: &[KIND_SEALED],
            },
        )
        .ok()?;
    let mut frame = Vec::with_capacity(1 + nonce.len() + sealed.len());
    frame.push(KIND_SEALED);
    frame.extend_from_slice(&nonce);
    frame.extend_from_slice(&sealed);
    Some(frame)
}

/// The foca message inside a datagram, or `None` when it is not ours to accept.
fn open(cipher: Option<&ChaCha20Poly1305>, frame: &[u8]) -> Option<Vec<u8>> {
    match (cipher, frame.split_first()) {
        (None, Some((&KIND_PLAIN, message))) => Some(message.to_vec()),
        (Some(cipher), Some((&KIND_SEALED, rest))) if rest.len() >= 12 + 16 => {
            let (nonce, sealed) = rest.split_at(12);
            let nonce = Nonce::try_from(nonce).ok()?;
            cipher
                .decrypt(
                    &nonce,
                    Payload {
                        msg: sealed,
                        aad: &[KIND_SEALED],
                    },
                )
                .ok()
        }
        _ => None,
    }
}

type Swim = Foca<NodeId, PostcardCodec, StdRng, MetaHandler>;

/// A timer foca asked for, due at `at`; `seq` keeps equal deadlines in request order.
struct Scheduled {
    at: Instant,
    seq: u64,
    timer: Timer<NodeId>,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

struct Driver {
    foca: Swim,
    runtime: AccumulatingRuntime<NodeId>,
    socket: UdpSocket,
    cipher: Option<ChaCha20Poly1305>,
    timers: BinaryHeap<Reverse<Scheduled>>,
    timer_seq: u64,
    /// Configured peers other than ourselves.
    peers: Vec<(String, SocketAddr)>,
    name: String,
    epoch: u64,
    meta_version: u64,
    meta: NodeMeta,
    metas: Arc<Mutex<MetaTable>>,
    members: watch::Sender<Members>,
    counters: Arc<Counters>,
    last_auth_warn: Option<Instant>,
    rejoin_interval: Duration,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; 2 * MAX_DATAGRAM];
        let mut rejoin = tokio::time::interval(self.rejoin_interval);
        rejoin.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((len, from)) => self.receive(&buf[..len], from),
                    Err(error) => tracing::debug!(%error, "membership receive failed"),
                },
                () = sleep_until(next_timer) => self.fire_due_timers(),
                _ = rejoin.tick() => self.announce_to_missing(),
            }
            self.flush().await;
        }
    }

    fn set_peers(&mut self, mut peers: Vec<(String, SocketAddr)>) {
        peers.retain(|(name, _)| *name != self.name);
        peers.sort();
        peers.dedup();
        self.peers = peers;
    }

    /// Queues our metadata under a new version (so that every member, including ones
    /// that already have an older version, takes it) and, when `now`, pushes it out
    /// at once rather than with the next messages.
    fn publish_meta(&mut self, now: bool) {
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

    fn receive(&mut self, frame: &[u8], from: SocketAddr) {
        let Some(message) = open(self.cipher.as_ref(), frame) else {
            self.counters.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%from, len = frame.len(), "membership message failed authentication");
            let now = Instant::now();
            if self
                .last_auth_warn
                .is_none_or(|last| now.duration_since(last) >= AUTH_WARN_EVERY)
            {
                self.last_auth_warn = Some(now);
                tracing::warn!(
                    "membership message from {} failed authentication — wrong or missing \
                     --memberlist-secret-file?",
                    from.ip()
                );
            }
            return;
        };
        self.counters.received.fetch_add(1, Ordering::Relaxed);
        let result = self.foca.handle_data(&message, &mut self.runtime);
        self.check(result, "handling a message");
    }

    fn fire_due_timers(&mut self) {
        let now = Instant::now();
        while self.timers.peek().is_some_and(|Reverse(s)| s.at <= now) {
            let Some(Reverse(scheduled)) = self.timers.pop() else {
                break;
            };
            let result = self.foca.handle_timer(scheduled.timer, &mut self.runtime);
            self.check(result, "handling a timer");
            // Timers foca schedules now must be ordered after the ones still queued.
            self.schedule();
        }
    }

    fn check(&self, result: Result<(), foca::Error>, doing: &str) {
        if let Err(error) = result {
            // Foca tolerates garbage and races (messages from ourselves, from members
            // it just declared down); nothing here needs more than a debug line.
            tracing::debug!(%error, "membership: {doing}");
        }
    }

    fn schedule(&mut self) {
        let now = Instant::now();
        while let Some((after, timer)) = self.runtime.to_schedule() {
            self.timer_seq += 1;
            self.timers.push(Reverse(Scheduled {
                at: now + after,
                seq: self.timer_seq,
                timer,
            }));
        }
    }

    /// Does what foca asked for: sends, timers, notifications; then publishes members.
    async fn flush(&mut self) {
        loop {
            self.schedule();
            let mut republish_meta = false;
            let mut announce = false;
            while let Some(notification) = self.runtime.to_notify() {
                match notification {
                    // Someone new (or back): it needs our metadata.
                    OwnedNotification::MemberUp(_) | OwnedNotification::Rename(_, _) => {
                        republish_meta = true;
                    }
                    // We were declared down (a partition healed): foca renewed our
                    // identity; tell the peers now rather than at the next rejoin tick.
                    OwnedNotification::Rejoin(id) => {
                        tracing::info!(
                            bump = id.bump,
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
                let Some(frame) = seal(self.cipher.as_ref(), &message) else {
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
        self.publish_members();
    }

    fn publish_members(&mut self) {
        let metas = self.metas.lock().unwrap_or_else(|e| e.into_inner());
        let mut alive: BTreeMap<String, NodeMeta> = self
            .foca
            .iter_members()
            .map(|m| {
                let id = m.id();
                // A restarted node's old metadata (settled, say) must not stand for the
                // new process: until its own arrives, the member is "not reported".
                let meta = metas
                    .get(&id.name)
                    .filter(|(epoch, _, _)| *epoch == id.epoch)
                    .map(|(_, _, meta)| meta.clone());
                (id.name.clone(), meta.unwrap_or_default())
            })
            .collect();
        drop(metas);
        alive.insert(self.name.clone(), self.meta.clone());
        self.members.send_if_modified(|members| {
            if members.alive == alive {
                false
            } else {
                members.alive = alive;
                true
            }
        });
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(secret: &[u8]) -> ChaCha20Poly1305 {
        cipher_for(secret)
    }

    #[test]
    fn sealed_frames_open_only_with_the_same_secret() {
        let right = cipher(b"s3cret");
        let frame = seal(Some(&right), b"hello").expect("sealed");
        assert_eq!(open(Some(&right), &frame).as_deref(), Some(&b"hello"[..]));
        assert_eq!(open(Some(&cipher(b"other")), &frame), None);
        assert_eq!(open(None, &frame), None, "no secret must not accept sealed");
        let plain = seal(None, b"hello").expect("plain");
        assert_eq!(
            open(Some(&right), &plain),
            None,
            "secret must not accept plain"
        );
        assert_eq!(open(None, &plain).as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn tampered_or_short_frames_are_rejected() {
        let c = cipher(b"k");
        let mut frame = seal(Some(&c), b"payload").expect("sealed");
        let last = frame.len() - 1;
        frame[last] ^= 1;
        assert_eq!(open(Some(&c), &frame), None);
        assert_eq!(open(Some(&c), &[KIND_SEALED, 1, 2]), None);
        assert_eq!(open(Some(&c), &[]), None);
        assert_eq!(open(None, &[]), None);
    }

    #[test]
    fn every_frame_has_a_fresh_nonce() {
        let c = cipher(b"k");
        let a = seal(Some(&c), b"same").expect("sealed");
        let b = seal(Some(&c), b"same").expect("sealed");
        assert_ne!(a, b);
    }

    #[test]
    fn newer_metadata_replaces_older_and_restarts_win() {
        let mut handler = MetaHandler {
            metas: Arc::default(),
        };
        let meta = |n: &str| NodeMeta {
            subnets: vec![n.parse().expect("net")],
            settled: false,
            started_at_ms: 0,
            reported: true,
        };
        let send = |h: &mut MetaHandler, epoch, version, m: &NodeMeta| {
            let data = encode_meta("a", epoch, version, m).expect("encode");
            foca::BroadcastHandler::receive_item(h, &data, None)
                .expect("decode")
                .is_some()
        };
        assert!(send(&mut handler, 5, 1, &meta("10.0.0.0/24")));
        assert!(
            !send(&mut handler, 5, 1, &meta("10.0.0.0/24")),
            "same version is stale"
        );
        assert!(send(&mut handler, 5, 2, &meta("10.0.1.0/24")));
        assert!(
            !send(&mut handler, 5, 1, &meta("10.0.0.0/24")),
            "older is stale"
        );
        assert!(
            send(&mut handler, 6, 1, &meta("10.0.2.0/24")),
            "restart wins"
        );
        let metas = handler.metas.lock().expect("lock");
        assert_eq!(metas["a"].2, meta("10.0.2.0/24"));
    }

    #[test]
    fn oversized_metadata_is_refused() {
        let subnets = (0..200)
            .map(|i| format!("10.{i}.0.0/16").parse().expect("net"))
            .collect();
        assert!(
            encode_meta(
                "n",
                1,
                1,
                &NodeMeta {
                    subnets,
                    settled: false,
                    started_at_ms: 0,
                    reported: true,
                }
            )
            .is_err()
        );
        assert!(encode_meta("n", 1, 1, &NodeMeta::default()).is_ok());
    }

    #[test]
    fn default_settings_are_valid() {
        Settings::default().foca_config().expect("valid");
        let bad = Settings {
            probe_rtt: Duration::from_millis(60),
            ..Settings::default()
        };
        assert!(bad.foca_config().is_err());
    }
}
