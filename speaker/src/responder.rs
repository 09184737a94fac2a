//! Answers ARP and Neighbor Solicitations for owned IPs, one task per interface.
//!
//! For each IP given to a link the task runs a small state machine:
//! `Probing` (RFC 5227 probes / duplicate-address NS; an answer from another MAC means the
//! IP is in use outside ferrolb, so it goes to `Conflict` and is not announced) →
//! `Announcing` (gratuitous ARP / unsolicited NA at once, then repeated) → `Steady`
//! (answering, with an optional periodic refresh). An IP taken away from the link stops
//! being answered at once: the next frame asking for it finds no entry.
//!
//! Flood resistance: the ARP socket's kernel filter passes only frames naming an IP the
//! link owns ([`arp_filter_for`], rebuilt whenever the link's IPs change), every lookup
//! per frame is one hash probe, and conflict warnings are rate-limited per IP (a host
//! spoofing our IPs cannot fill the log).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tracing::{debug, info, warn};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use ferrolb_api::Gratuitous;
use ferrolb_api::hash::stable_hash64;

use crate::arp::{self, Operation};
use crate::kernel_responder::{self, KernelResponder};
use crate::metrics::{InterfaceLabels, Metrics};
use crate::ndp::{self, NdpKind};
use crate::packet_socket::{
    ETH_P_ARP, ETH_P_IPV6, PacketSocket, arp_filter, arp_filter_for, ndp_filter,
};

/// At most one conflict warning per IP and link in this span; the others are counted
/// (metric `conflicts`) and their number is given with the next warning.
const CONFLICT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// A takeover from another ferrolb node is announced at once, without the RFC 5227
/// probe; this much later one probe checks that nobody else answers for the IP — another
/// load balancer's speaker that ferrolb was installed beside (MetalLB's, mid-migration),
/// or a host that took the address meanwhile. The previous ferrolb owner has stopped
/// answering long before: it drops an IP the moment its view changes, milliseconds after
/// this node's.
const TAKEOVER_CHECK_AFTER: Duration = Duration::from_millis(200);

/// Why an announced IP is probed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// Once, after a takeover: another host answering means the IP is held back.
    Takeover,
    /// Every [`Settings::verify_interval`]: another host answering is reported, and the
    /// IP still answered (it was ferrolb's first).
    Routine,
}

/// A probe of an announced IP: due, or sent and listened for until then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    Due(Instant, Purpose),
    /// Sent; `heard`: another host has answered it.
    Listening(Instant, Purpose, bool),
}

impl Check {
    fn at(self) -> Instant {
        match self {
            Check::Due(at, _) | Check::Listening(at, _, _) => at,
        }
    }
}

/// Timing of probes and announcements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Probes sent before an IP is first announced on a link (0 disables probing).
    pub probe_count: u32,
    pub probe_interval: Duration,
    /// How long to listen for an answer after the last probe.
    pub probe_wait: Duration,
    /// Gratuitous ARPs / unsolicited NAs sent on taking an IP (the first at once).
    pub announce_count: u32,
    pub announce_interval: Duration,
    /// Periodic re-announcement for fabrics that age out entries; None: off.
    pub refresh: Option<Duration>,
    /// After a conflict, probe again this much later at the soonest: a host that gives
    /// the address up (another load balancer's speaker removed in a migration, a
    /// misconfigured host fixed) is followed within this, not minutes later.
    pub conflict_retry: Duration,
    /// Re-probes of the IPs in conflict on one link stay under this many frames a second,
    /// however many there are: each one's retry grows with their number.
    pub conflict_probe_rate: u32,
    /// How often each announced IP is probed to see whether another host answers for it
    /// too (a router, a forgotten keepalived, another load balancer's speaker), spread
    /// out further on a link with many IPs so that these probes stay under
    /// `conflict_probe_rate` as well. None: never.
    pub verify_interval: Option<Duration>,
    /// Answer ARP for announced IPs in the kernel ([`crate::kernel_responder`]) where it
    /// can be attached; user space answers where it cannot.
    pub arp_in_kernel: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            probe_count: 2,
            probe_interval: Duration::from_millis(30),
            probe_wait: Duration::from_millis(100),
            announce_count: 5,
            announce_interval: Duration::from_millis(500),
            refresh: None,
            conflict_retry: Duration::from_secs(3),
            conflict_probe_rate: 20,
            verify_interval: Some(Duration::from_secs(10)),
            arp_in_kernel: true,
        }
    }
}

/// The retry of each of `in_conflict` IPs of a link: [`Settings::conflict_retry`], or
/// longer so that their probes together stay under [`Settings::conflict_probe_rate`].
fn conflict_retry(settings: &Settings, in_conflict: usize) -> Duration {
    let frames = in_conflict as f64 * f64::from(settings.probe_count.max(1));
    let spread = frames / f64::from(settings.conflict_probe_rate.max(1));
    settings.conflict_retry.max(Duration::from_secs_f64(spread))
}

/// The time between routine checks of each IP of a link with `ips` IPs:
/// [`Settings::verify_interval`], or longer so that they stay under
/// [`Settings::conflict_probe_rate`] (a bound of their own, besides the re-probes of
/// IPs in conflict).
fn verify_interval(settings: &Settings, ips: usize) -> Option<Duration> {
    let spread = ips as f64 / f64::from(settings.conflict_probe_rate.max(1));
    Some(
        settings
            .verify_interval?
            .max(Duration::from_secs_f64(spread)),
    )
}

/// Where in a check interval `ip`'s check falls, in [0, 1): fixed per IP, so a link's
/// checks are spread out.
fn spread_fraction(ip: IpAddr) -> f64 {
    let bytes = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    (stable_hash64(&[&bytes]) % 1024) as f64 / 1024.0
}

/// What one interface must answer for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkSpec {
    pub index: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub ips: BTreeSet<IpAddr>,
    /// IPs taken over from another ferrolb node: announced at once, without the RFC 5227
    /// probe (the address was ours a moment ago, and every millisecond is outage).
    pub takeovers: BTreeSet<IpAddr>,
    /// The IPs whose L2Advertisements set their own gratuitous ARP / NA policy; the
    /// others follow [`Settings`].
    pub gratuitous: BTreeMap<IpAddr, Gratuitous>,
}

/// How one IP is announced: [`Settings`] where its advertisements leave a field out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Announcing {
    count: u32,
    interval: Duration,
    refresh: Option<Duration>,
}

impl Announcing {
    fn of(settings: &Settings, policy: Option<&Gratuitous>) -> Announcing {
        let policy = policy.copied().unwrap_or_default();
        Announcing {
            // The API server keeps the fields in their bounds (validation refuses
            // others in files), so the conversions below never clamp in practice.
            count: policy
                .count
                .map_or(settings.announce_count, |c| c.unsigned_abs())
                .max(1),
            interval: policy
                .interval_milliseconds
                .map_or(settings.announce_interval, |ms| {
                    Duration::from_millis(ms.unsigned_abs().into())
                }),
            refresh: match policy.refresh_seconds {
                Some(s) if s <= 0 => None,
                Some(s) => Some(Duration::from_secs(s.unsigned_abs().into())),
                None => settings.refresh,
            },
        }
    }
}

/// Another host that answers for an IP of this node's, on one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Other {
    pub mac: [u8; 6],
    /// It answered before this node announced (or right after a takeover): the IP is
    /// held back there. Otherwise it answered a routine check of an IP this node
    /// announces, which it goes on announcing.
    pub held: bool,
}

/// The other hosts that answer for this node's IPs, by IP and link name. Published for
/// the node's record, so the Service's condition says who answers.
pub type Others = BTreeMap<(IpAddr, String), Other>;

/// The per-link tasks.
pub struct Responder {
    settings: Settings,
    others: Arc<watch::Sender<Others>>,
    /// Requests, replies, announcements and conflicts (the conflict count is also
    /// reported in the conflict warnings).
    metrics: Arc<Metrics>,
    links: BTreeMap<u32, (watch::Sender<LinkSpec>, JoinHandle<()>)>,
}

impl Responder {
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Responder {
        Responder {
            settings,
            metrics,
            others: Arc::new(watch::channel(Others::new()).0),
            links: BTreeMap::new(),
        }
    }

    /// The other hosts that answer for this node's IPs, on each link.
    pub fn others(&self) -> watch::Receiver<Others> {
        self.others.subscribe()
    }

    /// Makes the tasks match `desired`: a task per link with IPs, none for others.
    pub fn update(&mut self, desired: Vec<LinkSpec>) {
        let wanted: BTreeMap<u32, LinkSpec> = desired
            .into_iter()
            .filter(|l| !l.ips.is_empty())
            .map(|l| (l.index, l))
            .collect();
        // An IP taken from a link, or a link gone, holds nothing back there any more.
        self.others.send_if_modified(|others| {
            let before = others.len();
            others.retain(|(ip, name), _| {
                wanted
                    .values()
                    .any(|l| l.name == *name && l.ips.contains(ip))
            });
            others.len() != before
        });
        self.links.retain(|index, (tx, task)| {
            let keep =
                wanted.get(index).is_some_and(|w| w.mac == tx.borrow().mac) && !task.is_finished();
            if !keep {
                task.abort();
            }
            keep
        });
        for (index, spec) in wanted {
            match self.links.get(&index) {
                Some((tx, _)) => {
                    tx.send_if_modified(|current| {
                        let changed = *current != spec;
                        *current = spec.clone();
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(spec);
                    let task = tokio::spawn(run_link(
                        rx,
                        self.settings.clone(),
                        self.metrics.clone(),
                        self.others.clone(),
                    ));
                    self.links.insert(index, (tx, task));
                }
            }
        }
    }

    /// Stops answering everywhere.
    pub async fn shutdown(&mut self) {
        for (_, (_, task)) in std::mem::take(&mut self.links) {
            task.abort();
            let _ = task.await;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Probing { sent: u32, next: Instant },
    Announcing { left: u32, next: Instant },
    Steady { refresh_at: Option<Instant> },
    Conflict { retry_at: Instant },
}

impl State {
    fn answers(&self) -> bool {
        matches!(self, State::Announcing { .. } | State::Steady { .. })
    }

    fn due(&self) -> Option<Instant> {
        match *self {
            State::Probing { next, .. } | State::Announcing { next, .. } => Some(next),
            State::Steady { refresh_at } => refresh_at,
            State::Conflict { retry_at } => Some(retry_at),
        }
    }
}

struct LinkTask {
    spec: LinkSpec,
    settings: Settings,
    metrics: Arc<Metrics>,
    arp: PacketSocket,
    ndp: PacketSocket,
    /// Looked up for every frame that passes the filter: a hash map, O(1).
    states: HashMap<IpAddr, State>,
    joined: BTreeSet<[u8; 6]>,
    /// The IPv4 addresses the ARP socket's filter names now.
    filtered: Vec<Ipv4Addr>,
    /// Per IP: when a conflict was last logged, and how many were not logged since.
    conflict_log: HashMap<IpAddr, (Instant, u64)>,
    others: Arc<watch::Sender<Others>>,
    /// Takeovers whose check is due or listened for.
    checks: HashMap<IpAddr, Check>,
    /// Where ARP for announced IPs is answered in the kernel; None: in user space.
    kernel: Option<KernelResponder>,
}

/// The IPv4 addresses among `ips`, sorted.
fn ipv4s<'a>(ips: impl Iterator<Item = &'a IpAddr>) -> Vec<Ipv4Addr> {
    let mut v4: Vec<Ipv4Addr> = ips
        .filter_map(|ip| match ip {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .collect();
    v4.sort_unstable();
    v4
}

async fn run_link(
    mut rx: watch::Receiver<LinkSpec>,
    settings: Settings,
    metrics: Arc<Metrics>,
    others: Arc<watch::Sender<Others>>,
) {
    let spec = rx.borrow_and_update().clone();
    let open = |ethertype, filter: &[socket2::SockFilter]| {
        PacketSocket::open(spec.index, ethertype, filter)
    };
    let filtered = ipv4s(spec.ips.iter());
    let (arp, ndp) = match (
        open(ETH_P_ARP, &arp_filter_for(&filtered)),
        open(ETH_P_IPV6, &ndp_filter()),
    ) {
        (Ok(a), Ok(n)) => (a, n),
        (Err(e), _) | (_, Err(e)) => {
            warn!(interface = %spec.name, error = %e, "cannot open packet sockets (the speaker needs CAP_NET_RAW); not answering on this interface");
            return;
        }
    };
    let attach = settings.arp_in_kernel;
    let mut renewals = tokio::time::interval(kernel_responder::RENEW_EVERY);
    renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut task = LinkTask {
        spec: LinkSpec::default(),
        settings,
        metrics,
        arp,
        ndp,
        states: HashMap::new(),
        joined: BTreeSet::new(),
        filtered,
        conflict_log: HashMap::new(),
        others,
        checks: HashMap::new(),
        kernel: None,
    };
    // Announce first (a takeover's gratuitous ARP goes out at once); the kernel
    // responder takes over the answers once attached, a few milliseconds later.
    task.apply(spec).await;
    if attach {
        let spec = task.spec.clone();
        task.kernel = tokio::task::spawn_blocking(move || attach_kernel(&spec))
            .await
            .ok()
            .flatten();
        let ips: Vec<IpAddr> = task.states.keys().copied().collect();
        task.sync_kernel(ips);
    }
    task.metrics
        .arp_in_kernel
        .get_or_create(&Metrics::interface(&task.spec.name))
        .set(i64::from(task.kernel.is_some()));
    let mut arp_buf = vec![0u8; 2048];
    let mut ndp_buf = vec![0u8; 2048];
    loop {
        let due = task.next_due();
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let spec = rx.borrow_and_update().clone();
                task.apply(spec).await;
            }
            n = task.arp.recv(&mut arp_buf) => match n {
                Ok(n) => task.on_arp(&arp_buf[..n]).await,
                Err(e) => debug!(interface = %task.spec.name, error = %e, "ARP receive failed"),
            },
            n = task.ndp.recv(&mut ndp_buf) => match n {
                Ok(n) => task.on_ndp(&ndp_buf[..n]).await,
                Err(e) => debug!(interface = %task.spec.name, error = %e, "NDP receive failed"),
            },
            _ = sleep_until(due.unwrap_or(far)) => task.tick().await,
            _ = renewals.tick(), if task.kernel.is_some() => task.renew_kernel(),
        }
    }
}

/// The kernel responder on `spec`'s link, or None (logged) where it cannot be attached.
fn attach_kernel(spec: &LinkSpec) -> Option<KernelResponder> {
    match KernelResponder::attach(spec.index, spec.mac) {
        Ok(kernel) => {
            info!(interface = %spec.name, "answering ARP in the kernel");
            Some(kernel)
        }
        Err(e) => {
            warn!(interface = %spec.name, error = %e,
                "cannot answer ARP in the kernel (it needs Linux 6.6 or later, CAP_BPF and CAP_NET_ADMIN); answering in user space");
            None
        }
    }
}

impl LinkTask {
    /// Makes the kernel responder's map say what `ips` are to this link now.
    fn sync_kernel(&mut self, ips: impl IntoIterator<Item = IpAddr>) {
        let Some(kernel) = self.kernel.as_mut() else {
            return;
        };
        for ip in ips {
            let IpAddr::V4(v4) = ip else { continue };
            let answering = self.states.get(&ip).map(State::answers);
            if let Err(e) = kernel.set(v4, answering) {
                debug!(interface = %self.spec.name, ip = %ip, error = %e,
                    "the kernel responder cannot take this IP; answering it in user space");
            }
        }
    }

    /// Keeps the kernel responder answering, and counts what it answered.
    fn renew_kernel(&mut self) {
        let Some(kernel) = self.kernel.as_mut() else {
            return;
        };
        if let Err(e) = kernel.renew() {
            warn!(interface = %self.spec.name, error = %e, "cannot renew the kernel responder's lease");
        }
        match kernel.newly_answered() {
            Ok(0) => {}
            Ok(n) => {
                let labels = Metrics::interface(&self.spec.name);
                self.metrics.arp_requests.get_or_create(&labels).inc_by(n);
                self.metrics.arp_replies.get_or_create(&labels).inc_by(n);
            }
            Err(e) => {
                debug!(interface = %self.spec.name, error = %e, "cannot read the kernel responder's count")
            }
        }
    }

    async fn apply(&mut self, spec: LinkSpec) {
        let now = Instant::now();
        let mut dropped = Vec::new();
        self.states.retain(|ip, _| {
            let keep = spec.ips.contains(ip);
            if !keep {
                info!(ip = %ip, interface = %spec.name, "stopped answering");
                dropped.push(*ip);
            }
            keep
        });
        for ip in &dropped {
            self.other(*ip, None);
            self.checks.remove(ip);
        }
        self.sync_kernel(dropped);
        for ip in &spec.ips {
            if self.states.contains_key(ip) {
                continue;
            }
            let state = if self.settings.probe_count == 0 || spec.takeovers.contains(ip) {
                if self.settings.probe_count > 0 {
                    self.checks.insert(
                        *ip,
                        Check::Due(now + TAKEOVER_CHECK_AFTER, Purpose::Takeover),
                    );
                }
                State::Announcing {
                    left: self.announcing(&spec, *ip).count,
                    next: now,
                }
            } else {
                State::Probing { sent: 0, next: now }
            };
            self.states.insert(*ip, state);
            if let IpAddr::V6(v6) = ip {
                let group = ndp::multicast_mac(ndp::solicited_node_multicast(*v6));
                if self.joined.insert(group)
                    && let Err(e) = self.ndp.join_multicast(spec.index, group)
                {
                    warn!(interface = %spec.name, ip = %ip, error = %e, "cannot join the solicited-node multicast group");
                }
            }
        }
        let wanted = ipv4s(spec.ips.iter());
        if wanted != self.filtered {
            match self.arp.set_filter(&arp_filter_for(&wanted)) {
                Ok(()) => self.filtered = wanted,
                Err(e) => {
                    // Answering matters more than shedding a flood: pass all ARP.
                    let fallback = self.arp.set_filter(&arp_filter());
                    warn!(interface = %spec.name, error = %e, passing_all_arp = fallback.is_ok(),
                        "cannot narrow the ARP socket filter to the owned IPs");
                    if fallback.is_ok() {
                        self.filtered = wanted;
                    }
                }
            }
        }
        // A changed refresh applies from now, not after the old one falls due.
        for (ip, state) in self.states.iter_mut() {
            if let State::Steady { refresh_at } = state {
                let new = Announcing::of(&self.settings, spec.gratuitous.get(ip)).refresh;
                if new != Announcing::of(&self.settings, self.spec.gratuitous.get(ip)).refresh {
                    *refresh_at = new.map(|r| now + r);
                }
            }
        }
        self.conflict_log.retain(|ip, _| spec.ips.contains(ip));
        self.sync_kernel(spec.ips.iter().copied());
        self.spec = spec;
        self.tick().await;
    }

    /// When something is due next: a probe, an announcement, a retry, a check.
    fn next_due(&self) -> Option<Instant> {
        let states = self.states.values().filter_map(State::due);
        states.chain(self.checks.values().map(|c| c.at())).min()
    }

    /// Does what is due: probes, announcements, retries, checks of takeovers.
    async fn tick(&mut self) {
        let now = Instant::now();
        let checks: Vec<(IpAddr, Check)> = self
            .checks
            .iter()
            .filter(|(_, c)| c.at() <= now)
            .map(|(ip, c)| (*ip, *c))
            .collect();
        for (ip, check) in checks {
            match check {
                Check::Due(_, purpose) if self.states.get(&ip).is_some_and(State::answers) => {
                    self.send_probe(ip).await;
                    let until = now + self.settings.probe_wait;
                    self.checks
                        .insert(ip, Check::Listening(until, purpose, false));
                }
                Check::Listening(_, purpose, heard)
                    if self.states.get(&ip).is_some_and(State::answers) =>
                {
                    if !heard {
                        // Nobody else answered: whatever answered before has stopped.
                        self.other(ip, None);
                    }
                    self.schedule_check(ip, now, purpose == Purpose::Takeover);
                }
                _ => {
                    self.checks.remove(&ip);
                }
            }
        }
        let due: Vec<(IpAddr, State)> = self
            .states
            .iter()
            .filter(|(_, s)| s.due().is_some_and(|d| d <= now))
            .map(|(ip, s)| (*ip, *s))
            .collect();
        let changed: Vec<IpAddr> = due.iter().map(|(ip, _)| *ip).collect();
        for (ip, state) in due {
            let next = match state {
                State::Conflict { .. } => State::Probing { sent: 0, next: now },
                State::Probing { sent, .. } if sent < self.settings.probe_count => {
                    self.send_probe(ip).await;
                    let wait = if sent + 1 < self.settings.probe_count {
                        self.settings.probe_interval
                    } else {
                        self.settings.probe_wait
                    };
                    State::Probing {
                        sent: sent + 1,
                        next: now + wait,
                    }
                }
                State::Probing { .. } => {
                    info!(ip = %ip, interface = %self.spec.name, "announcing");
                    self.other(ip, None);
                    self.announce(ip).await;
                    let count = self.announcing(&self.spec, ip).count;
                    self.after_announce(ip, count.saturating_sub(1), now)
                }
                State::Announcing { left, .. } => {
                    self.announce(ip).await;
                    self.after_announce(ip, left.saturating_sub(1), now)
                }
                State::Steady { .. } => {
                    self.announce(ip).await;
                    self.after_announce(ip, 0, now)
                }
            };
            self.states.insert(ip, next);
            if next.answers() && !self.checks.contains_key(&ip) {
                self.schedule_check(ip, now, true);
            }
        }
        self.sync_kernel(changed);
    }

    /// The next routine check of `ip`, or none when they are off: one interval after the
    /// last, so that each IP is probed at most once per interval; the `first` somewhere
    /// in the interval, fixed per IP, so that IPs announced together are checked apart.
    ///
    /// The interval is stretched by every IP of the link, not only those answering: an
    /// upper bound, known without a scan (this runs for each IP a takeover brings).
    fn schedule_check(&mut self, ip: IpAddr, now: Instant, first: bool) {
        let ips = self.states.len();
        match verify_interval(&self.settings, ips).filter(|_| self.settings.probe_count > 0) {
            Some(every) => {
                let wait = if first {
                    every.mul_f64(spread_fraction(ip))
                } else {
                    every
                };
                self.checks
                    .insert(ip, Check::Due(now + wait, Purpose::Routine));
            }
            None => {
                self.checks.remove(&ip);
            }
        }
    }

    fn announcing(&self, spec: &LinkSpec, ip: IpAddr) -> Announcing {
        Announcing::of(&self.settings, spec.gratuitous.get(&ip))
    }

    fn after_announce(&self, ip: IpAddr, left: u32, now: Instant) -> State {
        let announcing = self.announcing(&self.spec, ip);
        if left > 0 {
            State::Announcing {
                left,
                next: now + announcing.interval,
            }
        } else {
            State::Steady {
                refresh_at: announcing.refresh.map(|r| now + r),
            }
        }
    }

    async fn send_probe(&self, ip: IpAddr) {
        let frame = match ip {
            IpAddr::V4(v4) => arp::probe(self.spec.mac, v4),
            IpAddr::V6(v6) => ndp::solicitation(v6, self.spec.mac, Ipv6Addr::UNSPECIFIED),
        };
        self.send(&frame, "probe").await;
    }

    async fn announce(&self, ip: IpAddr) {
        let frame = match ip {
            IpAddr::V4(v4) => arp::gratuitous(self.spec.mac, v4),
            IpAddr::V6(v6) => ndp::unsolicited_advertisement(v6, self.spec.mac, v6),
        };
        self.send(&frame, "announcement").await;
        self.count(&self.metrics.announcements);
    }

    fn count(&self, family: &Family<InterfaceLabels, Counter>) {
        family
            .get_or_create(&Metrics::interface(&self.spec.name))
            .inc();
    }

    async fn send(&self, frame: &[u8], what: &str) {
        let socket = if u16::from_be_bytes([frame[12], frame[13]]) == ETH_P_ARP {
            &self.arp
        } else {
            &self.ndp
        };
        if let Err(e) = socket.send(frame).await {
            warn!(interface = %self.spec.name, error = %e, "cannot send {what}");
        }
    }

    /// Publishes which other host answers for `ip` on this link, or (None) that none
    /// does.
    fn other(&self, ip: IpAddr, other: Option<Other>) {
        let key = (ip, self.spec.name.clone());
        self.others.send_if_modified(|others| match other {
            Some(o) => others.insert(key, o) != Some(o),
            None => others.remove(&key).is_some(),
        });
    }

    /// When to probe an IP in conflict again: `conflict_retry`, or later when so many
    /// IPs of the link are in conflict that their probes would pass `conflict_probe_rate`.
    fn conflict_retry(&self) -> Duration {
        let in_conflict = self
            .states
            .values()
            .filter(|s| matches!(s, State::Conflict { .. }))
            .count()
            + 1;
        conflict_retry(&self.settings, in_conflict)
    }

    /// Another MAC speaks for `ip`: before we announce, that is a conflict (RFC 5227);
    /// after, two hosts claim it, which the user must hear of.
    ///
    /// `answers_our_probe`: the frame is an ARP reply to a probe of this node's (to its
    /// MAC, target 0.0.0.0), come after the probe's wait: a slow responder (MetalLB's
    /// speaker answers probes too, hundreds of milliseconds late while busy), which holds
    /// the IP as much as a prompt one. Another ferrolb speaker answers within
    /// microseconds or not at all.
    fn claimed_by_other(&mut self, ip: IpAddr, mac: [u8; 6], answers_our_probe: bool) {
        let Some(state) = self.states.get(&ip).copied() else {
            return;
        };
        self.metrics.conflicts.inc();
        let conflicts = self.metrics.conflicts.get();
        let other = crate::mac::format(&mac);
        let now = Instant::now();
        let log = match self.conflict_log.get_mut(&ip) {
            Some((last, suppressed)) if now.duration_since(*last) < CONFLICT_LOG_INTERVAL => {
                *suppressed += 1;
                None
            }
            Some((last, suppressed)) => {
                *last = now;
                Some(std::mem::take(suppressed))
            }
            None => {
                self.conflict_log.insert(ip, (now, 0));
                Some(0)
            }
        };
        let listening = match self.checks.get_mut(&ip) {
            Some(Check::Listening(_, purpose, heard)) => {
                *heard = true;
                Some(*purpose)
            }
            _ => None,
        };
        if state.answers() && listening == Some(Purpose::Routine) {
            // ferrolb's first: go on answering, and say that another host does too.
            if let Some(suppressed) = log {
                warn!(ip = %ip, interface = %self.spec.name, other_mac = %other, conflicts, suppressed,
                    "another host answers for an IP this node announces (it answered a check); clients may reach either");
            }
            self.other(ip, Some(Other { mac, held: false }));
            return;
        }
        if matches!(state, State::Probing { .. })
            || (state.answers() && (listening == Some(Purpose::Takeover) || answers_our_probe))
        {
            self.checks.remove(&ip);
            let retry = self.conflict_retry();
            if let Some(suppressed) = log {
                warn!(ip = %ip, interface = %self.spec.name, other_mac = %other, conflicts, suppressed,
                    "IP is already in use by another host (it answered our probe); not announcing it, will probe again in {retry:?}");
            }
            self.states.insert(
                ip,
                State::Conflict {
                    retry_at: Instant::now() + retry,
                },
            );
            self.sync_kernel([ip]);
            self.other(ip, Some(Other { mac, held: true }));
        } else if state.answers()
            && let Some(suppressed) = log
        {
            warn!(ip = %ip, interface = %self.spec.name, other_mac = %other, conflicts, suppressed,
                "another host claims an IP this node announces (further warnings for it at most every {:?})",
                CONFLICT_LOG_INTERVAL);
        }
    }

    async fn on_arp(&mut self, frame: &[u8]) {
        let packet = match arp::parse(frame) {
            Ok(p) => p,
            Err(e) => {
                debug!(interface = %self.spec.name, error = %e, "dropped a malformed ARP frame");
                return;
            }
        };
        if packet.eth_source == self.spec.mac || packet.sender_mac == self.spec.mac {
            return;
        }
        let sender = IpAddr::V4(packet.sender_ip);
        if packet.sender_ip != Ipv4Addr::UNSPECIFIED && self.states.contains_key(&sender) {
            let answers_our_probe = packet.operation == Operation::Reply
                && packet.target_ip == Ipv4Addr::UNSPECIFIED
                && packet.target_mac == self.spec.mac;
            self.claimed_by_other(sender, packet.sender_mac, answers_our_probe);
            return;
        }
        // Another host *probing* for an address we probe is not a conflict here (RFC 5227
        // would have both back off): between ferrolb speakers it means a moment of
        // disagreement on the owner, and backing off would leave nobody answering. Only
        // a host that answers for the address, or announces it, holds it.
        let target = IpAddr::V4(packet.target_ip);
        match self.states.get(&target) {
            Some(s) if s.answers() && packet.operation == Operation::Request => {
                self.count(&self.metrics.arp_requests);
                let reply = arp::reply(&packet, self.spec.mac, packet.target_ip);
                self.send(&reply, "ARP reply").await;
                self.count(&self.metrics.arp_replies);
            }
            _ => {}
        }
    }

    async fn on_ndp(&mut self, frame: &[u8]) {
        let packet = match ndp::parse(frame) {
            Ok(p) => p,
            Err(e) => {
                debug!(interface = %self.spec.name, error = %e, "dropped a malformed NDP frame");
                return;
            }
        };
        if packet.eth_source == self.spec.mac {
            return;
        }
        let target = IpAddr::V6(packet.target);
        let Some(state) = self.states.get(&target).copied() else {
            return;
        };
        match packet.kind {
            NdpKind::Advertisement { target_lladdr, .. } => {
                let mac = target_lladdr.unwrap_or(packet.eth_source);
                if mac != self.spec.mac {
                    self.claimed_by_other(target, mac, false);
                }
            }
            NdpKind::Solicitation { .. } if state.answers() => {
                // Sourced from the target, as Linux does for its own addresses: some
                // resolvers (ndisc6 among them) ignore a global target's answer from a
                // link-local source.
                self.count(&self.metrics.ns_requests);
                let na = ndp::advertisement_for(&packet, self.spec.mac, packet.target);
                self.send(&na, "neighbor advertisement").await;
                self.count(&self.metrics.na_replies);
            }
            NdpKind::Solicitation { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routine_checks_come_every_10_s_and_stay_under_the_rate_on_a_busy_link() {
        let s = Settings::default();
        assert_eq!(verify_interval(&s, 1), Some(Duration::from_secs(10)));
        assert_eq!(verify_interval(&s, 200), Some(Duration::from_secs(10)));
        // 1,000 IPs on one link: one check every 50 s each, 20 a second in all.
        assert_eq!(verify_interval(&s, 1000), Some(Duration::from_secs(50)));
        let off = Settings {
            verify_interval: None,
            ..Settings::default()
        };
        assert_eq!(verify_interval(&off, 1), None);
        // Spread: IPs of one subnet fall all over the interval, not together.
        let fractions: BTreeSet<u64> = (1..=50u8)
            .map(|i| (spread_fraction(IpAddr::from([192, 0, 2, i])) * 10.0) as u64)
            .collect();
        assert!(fractions.len() >= 8, "{fractions:?}");
    }

    /// A few IPs in conflict are probed again after 3 s; many are spread out so that
    /// their probes stay under 20 frames a second on the link, however many there are.
    #[test]
    fn re_probes_of_conflicting_ips_stay_under_the_rate() {
        let s = Settings::default();
        assert_eq!(conflict_retry(&s, 1), Duration::from_secs(3));
        assert_eq!(conflict_retry(&s, 30), Duration::from_secs(3));
        for n in [31, 100, 1000, 10_000] {
            let retry = conflict_retry(&s, n);
            let rate = n as f64 * f64::from(s.probe_count) / retry.as_secs_f64();
            assert!(rate <= 20.0 + 1e-9, "{n} IPs: {rate} probes/s");
            assert!(retry > Duration::from_secs(3), "{n} IPs");
        }
    }
}
