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
//! * A restarted speaker (same name and address) has a new identity (a random epoch,
//!   no wall clock) and is admitted at once: if a peer still knows a previous identity
//!   of its name that wins, the peer says so and the new process outbids it. One that
//!   the others declared down (a cut link) renews its identity and rejoins when it can
//!   talk again.
//! * With a keyring every datagram is sealed with ChaCha20-Poly1305 under its first key
//!   and opened with any of its keys (rotation without a split); datagrams that fail to
//!   open — wrong key, no key, or sealed traffic reaching a node without one — are
//!   dropped and counted, so nodes with different keys never admit each other.
//! * Inside the seal each datagram names its sender's process and a counter: a replayed
//!   datagram is dropped (see `freshness`). Junk, forgeries, replays and datagrams over
//!   a sender's allowance cost a few checks and no work; they never reach foca, never
//!   rebuild the members, and never change who is alive.
//! * Traffic is per node, never per announced IP: a probe and an ack per
//!   [`Settings::probe_period`] in steady state, whatever the number of Services.

mod driver;
mod freshness;
mod identity;
mod metadata;
mod sealing;
mod settings;
pub mod simulation;
mod timers;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use foca::{Foca, PostcardCodec};
use rand::rngs::StdRng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

pub use metadata::NodeMeta;
pub use sealing::{Keyring, MAX_KEYS};
pub use settings::Settings;

use driver::{Driver, KeyringFile};
use identity::NodeId;
use metadata::{MetaHandler, encode_meta};

/// The UDP port speakers use for membership unless configured otherwise (memberlist's).
pub const DEFAULT_PORT: u16 = 7947;

/// How to run this node's membership.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's name (the Node object's): how the others know us.
    pub node_name: String,
    /// This node's InternalIP and the membership port; peers send here.
    pub bind: SocketAddr,
    /// Every node's name and membership address (may include ourselves: ignored).
    pub peers: Vec<(String, SocketAddr)>,
    /// The keys that seal membership (from `--memberlist-secret-file`); `None` sends
    /// plain messages, which anyone on the network can forge.
    pub keyring: Option<Keyring>,
    /// The file `keyring` came from: read again every few seconds, so that a rotated
    /// key takes effect without a restart.
    pub keyring_file: Option<PathBuf>,
    /// Failure-detection tuning.
    pub settings: Settings,
    /// What we tell the others about ourselves at start.
    pub meta: NodeMeta,
}

/// The live members as this node sees them.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Members {
    /// Node name to its metadata, ourselves included. Suspected members still count
    /// (SWIM): only members declared down leave. A member whose metadata has not
    /// arrived yet shows the default (no subnets) for a few milliseconds.
    pub alive: BTreeMap<String, NodeMeta>,
    /// How many times the peers declared this node down (it rejoined each time under a
    /// renewed identity).
    pub declared_down: u64,
    /// The nodes this node saw alive, itself included, shortly before it was last
    /// declared down: whether it was the side cut off (`crate::damping::cut_off`).
    pub seen_when_declared_down: BTreeSet<String>,
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
    /// Authenticated datagrams dropped as replays (seen already, or too old).
    pub replayed: u64,
    /// Authenticated datagrams dropped because their sender sent too many.
    pub rate_limited: u64,
    /// Whether membership is sealed (a keyring is configured).
    pub encrypted: bool,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    rejected: AtomicU64,
    replayed: AtomicU64,
    rate_limited: AtomicU64,
    encrypted: AtomicBool,
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
        let foca_config = config.settings.foca_config(config.peers.len().max(1))?;
        ensure!(
            !config.bind.ip().is_unspecified(),
            "membership must bind this node's own address (peers send to it), not {}",
            config.bind
        );
        encode_meta(&config.node_name, 0, 0, &config.meta)?;
        let socket = std::net::UdpSocket::bind(config.bind)
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .with_context(|| format!("binding membership socket {}", config.bind))?;
        enlarge_receive_queue(&socket);
        // Random, never 0 (0 means "no identity known" in a datagram's floor), and
        // persisted nowhere: no clock step can make it look older than a past one.
        let epoch = rand::random::<u64>() | 1;
        let identity = NodeId {
            name: config.node_name.clone(),
            addr: config.bind,
            bump: 0,
            epoch,
        };
        if config.keyring.is_none() {
            tracing::error!(
                "membership runs UNENCRYPTED (no --memberlist-secret-file): anyone who can \
                 send UDP to port {} can forge liveness and move or black out every IP",
                config.bind.port()
            );
        }
        let keyring_file = config.keyring_file.as_ref().map(|path| KeyringFile {
            path: path.clone(),
            contents: std::fs::read(path).unwrap_or_default(),
        });
        let metas = Arc::new(Mutex::new(HashMap::new()));
        let metas_changed = Arc::new(AtomicBool::new(false));
        let handler = MetaHandler {
            metas: Arc::clone(&metas),
            changed: Arc::clone(&metas_changed),
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
        let (members_tx, members_rx) = watch::channel(Members {
            alive,
            ..Members::default()
        });
        let counters = Arc::new(Counters::default());
        counters
            .encrypted
            .store(config.keyring.is_some(), Ordering::Relaxed);
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let driver_counters = Arc::clone(&counters);
        let settings = config.settings.clone();
        let driver = move |socket| {
            Driver::new(
                foca,
                socket,
                config.keyring,
                keyring_file,
                config.node_name,
                epoch,
                config.meta,
                metas,
                metas_changed,
                members_tx,
                driver_counters,
                settings,
            )
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
            replayed: self.counters.replayed.load(Ordering::Relaxed),
            rate_limited: self.counters.rate_limited.load(Ordering::Relaxed),
            encrypted: self.counters.encrypted.load(Ordering::Relaxed),
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

/// Room for a few thousand datagrams in the socket's queue: under a flood, a moment of
/// scheduling delay must not overflow it and drop the peers' probes with the junk.
/// Beyond `net.core.rmem_max` only with CAP_NET_ADMIN; without it, as much as allowed.
fn enlarge_receive_queue(socket: &std::net::UdpSocket) {
    const BYTES: usize = 4 << 20;
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &BYTES).is_err()
        && let Err(error) = setsockopt(socket, sockopt::RcvBuf, &BYTES)
    {
        tracing::debug!(%error, "membership: cannot enlarge the receive queue");
    }
}
