//! Membership at sizes no lab on one machine reaches: thousands of foca instances with
//! ferrolb's settings ([`Settings::foca_config`]) and identities, in one process, on a
//! simulated network with simulated time, to measure how long the survivors take to
//! declare a lost member down and what steady-state membership costs each node.
//!
//! What is real: foca, its configuration, our identity type and codec, every timer and
//! datagram foca asks for. What is simulated: the clock, and a network that delivers
//! every datagram after 100 to 300 µs and loses none. Left out: the sealing (its bytes
//! are added to the figures), the nodes' metadata gossip (sent only when a node's
//! subnets or state change), and the rejoin loop (nobody rejoins here). Start-up is
//! skipped: every member begins knowing every other, as after convergence.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, Member, OwnedNotification, PostcardCodec, Timer};
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};

use super::Settings;
use super::identity::NodeId;
use super::sealing::{HEADER, SEALED_OVERHEAD};

/// IPv4 and UDP headers, on every datagram.
const IP_UDP: usize = 20 + 8;

/// What one node loss in a simulated cluster showed.
#[derive(Clone, Debug)]
pub struct NodeLoss {
    pub members: usize,
    /// From the loss until each survivor declared the lost member down, sorted; one
    /// entry per survivor that did so before the deadline.
    pub declared_after: Vec<Duration>,
    /// Members other than the lost one that some survivor declared down (false
    /// failovers; the network here loses nothing, so any is a fault).
    pub false_downs: usize,
    /// Datagrams and bytes (with IP, UDP and sealing headers) each node sent per second
    /// in the steady state before the loss, averaged over the nodes.
    pub datagrams_per_node_per_s: f64,
    pub bytes_per_node_per_s: f64,
}

impl NodeLoss {
    /// The time by which every survivor had declared the loss, if all did.
    pub fn converged_after(&self) -> Option<Duration> {
        (self.declared_after.len() == self.members - 1)
            .then(|| self.declared_after.last().copied())
            .flatten()
    }

    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.declared_after.len();
        (n > 0).then(|| self.declared_after[((n - 1) as f64 * q).round() as usize])
    }
}

enum Event {
    Timer(usize, Timer<NodeId>),
    Datagram(usize, Vec<u8>),
}

struct Queued {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Queued {}
impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Queued {
    /// Earliest first in a max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Network {
    queue: BinaryHeap<Queued>,
    seq: u64,
    now: u64,
    rng: StdRng,
}

impl Network {
    fn push(&mut self, after: Duration, event: Event) {
        self.seq += 1;
        self.queue.push(Queued {
            at: self.now + after.as_nanos() as u64,
            seq: self.seq,
            event,
        });
    }
}

type Swim = Foca<NodeId, PostcardCodec, StdRng, foca::NoCustomBroadcast>;

/// `members` nodes run for `steady` (after a settling second), then one of them stops
/// answering at once (power lost); the simulation runs until every survivor has declared
/// it down or `deadline` has passed.
pub fn node_loss(
    members: usize,
    settings: &Settings,
    steady: Duration,
    deadline: Duration,
    seed: u64,
) -> anyhow::Result<NodeLoss> {
    anyhow::ensure!(members >= 2, "a loss needs at least two members");
    let config = settings.foca_config(members)?;
    let ids: Vec<NodeId> = (0..members)
        .map(|i| NodeId {
            name: format!("node-{i:05}"),
            addr: (
                [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
                super::DEFAULT_PORT,
            )
                .into(),
            bump: 0,
            epoch: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i as u64 | 1,
        })
        .collect();
    let index: HashMap<String, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.name.clone(), i))
        .collect();
    let mut net = Network {
        queue: BinaryHeap::new(),
        seq: 0,
        now: 0,
        rng: StdRng::seed_from_u64(seed),
    };
    let mut runtime = AccumulatingRuntime::new();
    let mut nodes: Vec<Swim> = Vec::with_capacity(members);
    for (i, id) in ids.iter().enumerate() {
        let mut foca = Foca::new(
            id.clone(),
            config.clone(),
            StdRng::seed_from_u64(seed ^ (i as u64 + 1)),
            PostcardCodec,
        );
        let others = ids.iter().filter(|o| *o != id).cloned().map(Member::alive);
        foca.apply_many(others, false, &mut runtime)?;
        nodes.push(foca);
        drain(i, &mut runtime, &mut net, &index, &mut Stats::default());
    }

    let settle = Duration::from_secs(1);
    let lost = members / 2;
    let mut stats = Stats::default();
    let mut loss_at: Option<u64> = None;
    let mut declared = vec![None::<u64>; members];
    let mut false_downs = std::collections::BTreeSet::new();
    let steady_from = settle.as_nanos() as u64;
    let steady_until = steady_from + steady.as_nanos() as u64;
    while let Some(Queued { at, event, .. }) = net.queue.pop() {
        net.now = at;
        if loss_at.is_none() && at >= steady_until {
            loss_at = Some(at);
        }
        if let Some(t) = loss_at
            && at > t + deadline.as_nanos() as u64
        {
            break;
        }
        let node = match &event {
            Event::Timer(node, _) | Event::Datagram(node, _) => *node,
        };
        if loss_at.is_some() && node == lost {
            continue; // a dead node hears nothing and does nothing
        }
        let result = match event {
            Event::Timer(_, timer) => nodes[node].handle_timer(timer, &mut runtime),
            Event::Datagram(_, bytes) => nodes[node].handle_data(&bytes, &mut runtime),
        };
        result.map_err(|e| anyhow::anyhow!("foca on node {node}: {e}"))?;
        let counting = at >= steady_from && at < steady_until;
        let mut sent = Stats::default();
        for notification in drain(node, &mut runtime, &mut net, &index, &mut sent) {
            if let OwnedNotification::MemberDown(id) = notification {
                if index[&id.name] == lost && loss_at.is_some() {
                    declared[node].get_or_insert(at);
                } else {
                    false_downs.insert(id.name);
                }
            }
        }
        if counting {
            stats.datagrams += sent.datagrams;
            stats.bytes += sent.bytes;
        }
        if loss_at.is_some()
            && declared
                .iter()
                .enumerate()
                .all(|(i, d)| i == lost || d.is_some())
        {
            break;
        }
    }
    let loss_at = loss_at.unwrap_or(net.now);
    let mut declared_after: Vec<Duration> = declared
        .iter()
        .flatten()
        .map(|t| Duration::from_nanos(t - loss_at))
        .collect();
    declared_after.sort();
    let per_node_s = members as f64 * steady.as_secs_f64();
    Ok(NodeLoss {
        members,
        declared_after,
        false_downs: false_downs.len(),
        datagrams_per_node_per_s: stats.datagrams as f64 / per_node_s,
        bytes_per_node_per_s: stats.bytes as f64 / per_node_s,
    })
}

#[derive(Default)]
struct Stats {
    datagrams: u64,
    bytes: u64,
}

/// Sends what `node`'s foca asked to send (unless the receiver is gone), schedules its
/// timers, and returns its notifications.
fn drain(
    node: usize,
    runtime: &mut AccumulatingRuntime<NodeId>,
    net: &mut Network,
    index: &HashMap<String, usize>,
    stats: &mut Stats,
) -> Vec<OwnedNotification<NodeId>> {
    while let Some((to, bytes)) = runtime.to_send() {
        stats.datagrams += 1;
        stats.bytes += (bytes.len() + HEADER + SEALED_OVERHEAD + IP_UDP) as u64;
        let latency = Duration::from_micros(net.rng.random_range(100..300));
        net.push(latency, Event::Datagram(index[&to.name], bytes.to_vec()));
    }
    while let Some((after, timer)) = runtime.to_schedule() {
        net.push(after, Event::Timer(node, timer));
    }
    std::iter::from_fn(|| runtime.to_notify()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEDS: u64 = 5;

    /// Every survivor of 50 declares the lost member down, and nobody else is declared
    /// down (simulated time: the run is the same every time).
    #[test]
    fn every_survivor_declares_a_lost_member_down_and_nobody_else() {
        let loss = node_loss(
            50,
            &Settings::default(),
            Duration::from_secs(1),
            Duration::from_secs(10),
            7,
        )
        .expect("runs");
        assert!(loss.converged_after().is_some(), "{loss:?}");
        assert_eq!(loss.false_downs, 0, "{loss:?}");
        assert!(loss.datagrams_per_node_per_s > 0.0);
    }

    /// In a cluster of 200 the news of a death reaches every survivor by gossip: none is
    /// left to find out by probing the dead node itself, which took one of them 13 s
    /// when each update was passed on 10 times (see `Settings::transmissions_for`).
    #[test]
    fn in_a_larger_cluster_no_survivor_is_left_behind() {
        for seed in 1..=SEEDS {
            let loss = node_loss(
                200,
                &Settings::default(),
                Duration::from_secs(3),
                Duration::from_secs(30),
                seed,
            )
            .expect("runs");
            let last = loss.converged_after().expect("every survivor declared it");
            let median = loss.quantile(0.5).expect("some did");
            assert!(
                last < median * 3,
                "seed {seed}: the last survivor knew after {last:?}, the median after {median:?}"
            );
        }
    }
}
