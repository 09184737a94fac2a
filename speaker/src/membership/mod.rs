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

mod driver;
mod identity;
mod metadata;
mod sealing;
mod settings;
mod timers;

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use foca::{AccumulatingRuntime, Foca, PostcardCodec};
use rand::rngs::StdRng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

pub use metadata::NodeMeta;
pub use settings::Settings;

use driver::Driver;
use identity::NodeId;
use metadata::{MetaHandler, encode_meta};
use sealing::cipher_for;

/// The UDP port speakers use for membership unless configured otherwise (memberlist's).
pub const DEFAULT_PORT: u16 = 7946;

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
