//! The membership loop: feeds foca datagrams, timers and commands, sends what it asks to
//! send, and publishes the live members.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chacha20poly1305::ChaCha20Poly1305;
use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec};
use rand::rngs::StdRng;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::identity::NodeId;
use super::metadata::{MetaHandler, MetaTable, encode_meta};
use super::sealing::{MAX_DATAGRAM, open, seal};
use super::timers::{Scheduled, sleep_until};
use super::{Command, Counters, Members, NodeMeta};

/// How often at most a failed authentication is logged at warn.
const AUTH_WARN_EVERY: Duration = Duration::from_secs(10);

pub(super) type Swim = Foca<NodeId, PostcardCodec, StdRng, MetaHandler>;

/// The membership task: owns foca, the socket and the timers, on a thread of its own.
pub(super) struct Driver {
    pub(super) foca: Swim,
    pub(super) runtime: AccumulatingRuntime<NodeId>,
    pub(super) socket: UdpSocket,
    pub(super) cipher: Option<ChaCha20Poly1305>,
    pub(super) timers: BinaryHeap<Reverse<Scheduled>>,
    pub(super) timer_seq: u64,
    /// Configured peers other than ourselves.
    pub(super) peers: Vec<(String, SocketAddr)>,
    pub(super) name: String,
    pub(super) epoch: u64,
    pub(super) meta_version: u64,
    pub(super) meta: NodeMeta,
    pub(super) metas: Arc<Mutex<MetaTable>>,
    pub(super) members: watch::Sender<Members>,
    pub(super) counters: Arc<Counters>,
    pub(super) last_auth_warn: Option<Instant>,
    pub(super) rejoin_interval: Duration,
}

impl Driver {
    pub(super) async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
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

    pub(super) fn set_peers(&mut self, mut peers: Vec<(String, SocketAddr)>) {
        peers.retain(|(name, _)| *name != self.name);
        peers.sort();
        peers.dedup();
        self.peers = peers;
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
