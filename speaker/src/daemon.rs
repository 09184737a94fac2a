//! The speaker's main loop, the same for files and for a cluster: objects in, this
//! node's announcements, forwarding rules and membership out.
//!
//! Where the objects come from is an [`Objects`]: a directory of manifests
//! ([`crate::standalone`]) or the API server's watches ([`crate::kubernetes`]). The loop
//! never waits on the API server: announcements and failover run on the last objects
//! seen and on membership alone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use anyhow::Context;
use ferrolb_api::manifests::Manifests;
use ferrolb_api::{Gratuitous, OtherResponder};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{Instrument, error, info, warn};

use crate::announcements::{Addresses, NodePlan, plan};
use crate::cluster::{Cluster, ClusterOptions};
use crate::election::ClusterView;
use crate::forwarding::{ForwardRule, Forwarder};
use crate::interfaces::{self, Link};
use crate::kernel_arp;
use crate::metrics::Metrics;
use crate::node_network;
use crate::probe;
use crate::responder::{LinkSpec, Other, Others, Responder, Settings};

/// Where the speaker's objects come from.
pub trait Objects {
    /// The objects as they are now.
    fn current(&mut self) -> Arc<Manifests>;
    /// Resolves when the objects may have changed; an error stops the speaker.
    fn changed(&mut self) -> impl Future<Output = anyhow::Result<()>>;
    /// What this node owns after each change, for sources that report it.
    fn owned(&mut self, _owned: Vec<Ownership>) {}
    /// What this node says of itself besides its IPs, for sources that report it.
    fn node_health(&mut self, _health: NodeHealth) {}
    /// Whether `fromNodeNetwork` pools are resolved here (a cluster, where the result
    /// can be written to the pool's status for every node and the controller).
    fn resolves_pools(&self) -> bool {
        false
    }
    /// What this node resolved for a `fromNodeNetwork` pool, to be written.
    fn resolved(&mut self, _resolved: Resolved) {}
}

/// A `fromNodeNetwork` pool as this node resolved it.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    pub pool: String,
    pub status: ferrolb_api::NodeNetworkStatus,
}

/// What a node says of itself besides its IPs, in its record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeHealth {
    /// Why kube-proxy fails its health check here (`None`: it passes, or is unchecked).
    pub kube_proxy_failing: Option<String>,
    /// The kernel answers ARP for VIPs this node does not announce ([`kernel_arp`]).
    pub kernel_answers_arp: Option<String>,
}

/// What this node says about one IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ownership {
    pub ip: IpAddr,
    /// The interfaces it answers on; empty: no node may announce it now (said by the
    /// node that announced it last).
    pub interfaces: Vec<String>,
    pub services: Vec<ferrolb_allocator::ServiceKey>,
    /// Another host that answers for the IP: instead of this node (held back), or too.
    pub other: Option<OtherResponder>,
}

pub struct Options {
    pub node_name: String,
    pub settings: Settings,
    /// Speaker membership; `None`: every declared node counts as alive.
    pub cluster: Option<ClusterOptions>,
    /// Allocate from the objects (standalone) or take the IPs in Service status.
    pub addresses: Addresses,
    pub metrics: Arc<Metrics>,
    /// Whether this speaker may forward VIP traffic to NodePorts (nftables, so
    /// CAP_NET_ADMIN). Off, it never touches nftables, and advertisements asking for it
    /// are reported, not served.
    pub node_port_forwarding: bool,
}

/// The longest a change of objects waits for the previous pass's cost to be paid off.
const MAX_OBJECTS_HOLD: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs until SIGTERM or SIGINT, then withdraws everything it announced.
pub async fn run(mut objects: impl Objects, opts: Options) -> anyhow::Result<()> {
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut links = interfaces::watch()
        .await
        .context("watching network interfaces (rtnetlink)")?;
    let forwarder = Forwarder::new();
    // A predecessor killed with rules in place leaves them behind: start from nothing.
    let mut forwarding_ok = !opts.node_port_forwarding
        || match forwarder.reset() {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "nftables unavailable: NodePort forwarding is disabled until it works");
                false
            }
        };
    // Whether the NodePort forwarding this speaker may not do has been reported.
    let mut unforwarded_reported = false;
    let mut responder = Responder::new(opts.settings.clone(), opts.metrics.clone());
    let mut others = responder.others();
    let mut state = Reported::default();
    let mut manifests = objects.current();
    let mut cluster = join(&manifests, &opts, &links.borrow()).await;
    let mut down_at: BTreeMap<String, StdInstant> = BTreeMap::new();
    let mut alive_before: BTreeSet<String> = BTreeSet::new();
    let mut rejected_before = 0;
    let mut replayed_before = 0;
    let mut declared_down_before = 0;
    let (resolved_tx, mut resolved_rx) = tokio::sync::mpsc::channel::<Resolved>(8);
    let mut resolving = Resolving::default();
    loop {
        let view = match (&mut cluster, &opts.cluster) {
            (Some(c), _) => c.view(),
            // Configured but not started: owning anything now could mean two owners.
            (None, Some(_)) => ClusterView {
                members: Some(BTreeMap::new()),
            },
            (None, None) => ClusterView::everyone(),
        };
        if let Some(c) = &cluster {
            let declared_down = c.times_declared_down();
            opts.metrics
                .declared_down_by_peers
                .inc_by(declared_down.saturating_sub(declared_down_before));
            declared_down_before = declared_down;
            opts.metrics.recent_cut_offs.set(c.recent_cut_offs() as i64);
            opts.metrics.settled.set(i64::from(c.settled()));
        }
        if let Some(members) = &view.members {
            let alive: BTreeSet<String> = members.keys().cloned().collect();
            if alive != alive_before {
                info!(alive = ?alive, "members that may own IPs changed");
            }
            for gone in alive_before.difference(&alive) {
                down_at.insert(gone.clone(), StdInstant::now());
                opts.metrics.members_declared_down.inc();
            }
            down_at.retain(|n, t| !alive.contains(n) && t.elapsed().as_secs() < 60);
            opts.metrics.members.set(alive.len() as i64);
            alive_before = alive;
        }
        let mut health = NodeHealth::default();
        if let Some(c) = cluster.as_ref().filter(|c| c.checks_kube_proxy()) {
            health.kube_proxy_failing = c.kube_proxy_failing();
            opts.metrics
                .kube_proxy_healthy
                .set(i64::from(health.kube_proxy_failing.is_none()));
        }
        if let Some(stats) = cluster.as_ref().and_then(Cluster::stats) {
            Metrics::count_to(
                &opts.metrics.membership_rejected,
                stats.rejected,
                &mut rejected_before,
            );
            Metrics::count_to(
                &opts.metrics.membership_replayed,
                stats.replayed + stats.rate_limited,
                &mut replayed_before,
            );
            opts.metrics
                .membership_encrypted
                .set(i64::from(stats.encrypted));
        }
        let pass = StdInstant::now();
        let plan = plan(&manifests, &opts.node_name, &view, &opts.addresses);
        state
            .orphans
            .retain(|ip, _| plan.owners.get(ip) == Some(&None));
        let current_links = links.borrow_and_update().clone();
        let previous = state.owned.clone();
        let previous_owners = state.owners.clone();
        let specs = link_specs(&plan, &opts.node_name, &current_links, &mut state);
        for ip in previous.keys().filter(|ip| !state.owned.contains_key(*ip)) {
            if let Some(services) = plan.orphans.get(ip) {
                state.orphans.insert(*ip, services.clone());
            }
        }
        state.report(&plan);
        responder.update(specs);
        // Let the link tasks announce a takeover now, before the rest of this pass (the
        // nftables rules, the record): a task spawned from here waits otherwise, as
        // no other worker may take it.
        tokio::task::yield_now().await;
        account(&opts.metrics, &previous, &previous_owners, &state, &down_at);
        let others_now = others.borrow_and_update().clone();
        opts.metrics.set_announced(state.owned.iter(), &others_now);
        // Which node each other MAC is, when it is one of ours: the kernel's neighbour
        // table is read only while another host answers for something.
        let nodes_by_mac = if others_now.is_empty() {
            HashMap::new()
        } else {
            crate::neighbours::nodes_by_mac(
                &crate::neighbours::parse_proc_net_arp(
                    &std::fs::read_to_string("/proc/net/arp").unwrap_or_default(),
                ),
                manifests.nodes.iter().map(|n| &*n.object),
            )
        };
        // The kernel's own ARP answers for VIPs held by local links (IPVS): sysctls
        // are read only when some local link holds a VIP this node does not announce.
        let vips: BTreeSet<IpAddr> = plan.owners.keys().copied().collect();
        let mine: BTreeSet<IpAddr> = state.owned.keys().copied().collect();
        let held = kernel_arp::held_locally(&current_links, &vips, &mine);
        let kernel = kernel_arp::kernel_answers(&current_links, &held, kernel_arp::read_arp_ignore);
        opts.metrics
            .vips_answered_by_kernel
            .set(kernel.as_ref().map_or(0, |k| k.vips.len() as i64));
        health.kernel_answers_arp = kernel.map(|k| k.to_string());
        match (&health.kernel_answers_arp, &state.kernel_said) {
            (Some(now), said) if said.as_ref() != Some(now) => warn!("{now}"),
            (None, Some(_)) => {
                info!("this node's kernel no longer answers ARP for VIPs it does not announce")
            }
            _ => {}
        }
        state.kernel_said = health.kernel_answers_arp.clone();
        objects.node_health(health);
        let owned = ownership(&plan, &state, &others_now, &nodes_by_mac);
        opts.metrics.set_responders(&owned);
        opts.metrics.set_services_announced(
            &opts.node_name,
            owned
                .iter()
                .filter(|o| {
                    !o.interfaces.is_empty() && !o.other.as_ref().is_some_and(|o| o.held_back)
                })
                .map(|o| (&o.ip, &o.services[..])),
        );
        objects.owned(owned);
        if !opts.node_port_forwarding {
            let asked = plan.forwards.first();
            if let Some(first) = asked
                && !unforwarded_reported
            {
                error!(
                    "{} port(s) of VIPs this node owns (first {}:{}) are under an L2Advertisement \
                     with spec.forwarding: nodePort, but this speaker runs with \
                     --node-port-forwarding=false (chart: speaker.nodePortForwarding.enabled, which \
                     grants CAP_NET_ADMIN): their traffic is not forwarded to the NodePort",
                    plan.forwards.len(),
                    first.vip,
                    first.port
                );
            }
            unforwarded_reported = asked.is_some();
        } else if plan.forwards != state.forwards || !forwarding_ok {
            // `nft` runs twice, tens of milliseconds: off the worker, so that the link
            // tasks answering for the IPs just taken are not held up behind it.
            let applied = if tokio::runtime::Handle::current().runtime_flavor()
                == tokio::runtime::RuntimeFlavor::MultiThread
            {
                tokio::task::block_in_place(|| forwarder.apply(&plan.forwards))
            } else {
                forwarder.apply(&plan.forwards)
            };
            match applied {
                Ok(_) => {
                    if plan.forwards != state.forwards {
                        info!(rules = plan.forwards.len(), "forwarding rules applied");
                    }
                    forwarding_ok = true;
                    state.forwards = plan.forwards.clone();
                }
                Err(e) if !plan.forwards.is_empty() || forwarding_ok => {
                    error!(error = %e, "cannot apply NodePort forwarding rules");
                    forwarding_ok = false;
                }
                Err(_) => {}
            }
        }
        if objects.resolves_pools() {
            for warning in node_network::newly_taken(&manifests) {
                state.problem(warning);
            }
            let pools = node_network::to_resolve(&manifests, &opts.node_name, &view);
            resolving.keep(&pools);
            for pool in pools {
                if resolving.start(&pool.pool) {
                    tokio::spawn(
                        resolve_pool(
                            pool,
                            current_links.clone(),
                            manifests.clone(),
                            view.clone(),
                            opts.node_name.clone(),
                            resolved_tx.clone(),
                        )
                        .in_current_span(),
                    );
                }
            }
        }
        let cost = pass.elapsed();
        opts.metrics.plan_seconds.observe(cost.as_secs_f64());
        // With many Services a pass takes milliseconds, and while they are being created
        // the objects change all the time: take the next change of objects only after
        // four times the last pass, so planning uses at most a fifth of a core. Membership
        // and link changes (failover) are never held back.
        let objects_after = tokio::time::Instant::now() + (cost * 4).min(MAX_OBJECTS_HOLD);
        // Wait for something to change.
        let wake = cluster.as_ref().and_then(Cluster::wake_at);
        tokio::select! {
            _ = terminate.recv() => return withdraw(responder, &forwarder, &state, cluster).await,
            _ = interrupt.recv() => return withdraw(responder, &forwarder, &state, cluster).await,
            // Another host answers for an IP of this node's, or stopped answering.
            Ok(()) = others.changed() => {}
            changed = links.changed() => {
                changed.context("the interface watcher stopped")?;
                if let Some(c) = &mut cluster {
                    c.set_subnets(interfaces::reachable_subnets(&links.borrow()));
                }
            }
            changed = async {
                match &mut cluster {
                    Some(c) => c.changed().await,
                    None => std::future::pending().await,
                }
            } => changed?,
            _ = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            _ = async {
                match resolving.next_retry() {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            Some(resolved) = resolved_rx.recv() => {
                resolving.finished(&resolved.pool);
                match &resolved.status.problem {
                    None => info!(pool = %resolved.pool, addresses = ?resolved.status.addresses, skipped = ?resolved.status.skipped, "resolved the pool's addresses from the node network"),
                    Some(p) => warn!(pool = %resolved.pool, retry_in = ?RESOLVE_RETRY, "cannot resolve the pool from the node network: {p}"),
                }
                objects.resolved(resolved);
            }
            changed = async {
                tokio::time::sleep_until(objects_after).await;
                objects.changed().await
            } => {
                changed?;
                manifests = objects.current();
                match &mut cluster {
                    Some(c) => c.set_peers_from(&manifests),
                    None => cluster = join(&manifests, &opts, &links.borrow()).await,
                }
            }
        }
    }
}

/// How long a probe waits for answers after its last round.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How soon a pool that could not be resolved is tried again.
const RESOLVE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// Which pools this node is resolving, and when it last tried each.
#[derive(Default)]
struct Resolving {
    in_flight: BTreeSet<String>,
    tried: BTreeMap<String, tokio::time::Instant>,
}

impl Resolving {
    /// Forgets pools that no longer need this node.
    fn keep(&mut self, pools: &[node_network::Unresolved]) {
        let wanted: BTreeSet<&str> = pools.iter().map(|p| p.pool.as_str()).collect();
        self.tried.retain(|p, _| wanted.contains(p.as_str()));
    }

    /// Whether to start resolving `pool` now (then it counts as started).
    fn start(&mut self, pool: &str) -> bool {
        let due = self
            .tried
            .get(pool)
            .is_none_or(|t| t.elapsed() >= RESOLVE_RETRY);
        if self.in_flight.contains(pool) || !due {
            return false;
        }
        self.in_flight.insert(pool.to_string());
        self.tried
            .insert(pool.to_string(), tokio::time::Instant::now());
        true
    }

    fn finished(&mut self, pool: &str) {
        self.in_flight.remove(pool);
    }

    fn next_retry(&self) -> Option<tokio::time::Instant> {
        self.tried
            .iter()
            .filter(|(p, _)| !self.in_flight.contains(*p))
            .map(|(_, t)| *t + RESOLVE_RETRY)
            .min()
    }
}

/// Resolves one pool: the subnet and candidates from what this node knows, then a probe
/// of the candidates on the wire.
async fn resolve_pool(
    pool: node_network::Unresolved,
    links: Vec<Link>,
    manifests: Arc<Manifests>,
    view: ClusterView,
    me: String,
    done: tokio::sync::mpsc::Sender<Resolved>,
) {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let gateways = node_network::gateways(&read("/proc/net/route"), &read("/proc/net/ipv6_route"));
    let nodes: Vec<&k8s_openapi::api::core::v1::Node> =
        manifests.nodes.iter().map(|n| &*n.object).collect();
    let network = node_network::Network {
        me: &me,
        links: &links,
        nodes: &nodes,
        view: &view,
        gateways: &gateways,
    };
    let status = match node_network::candidates(&pool, &network) {
        Err(problem) => node_network::unresolvable(problem, &me),
        Ok(found) => {
            let mut by_link: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
            for (family, index) in &found.links {
                by_link
                    .entry(*index)
                    .or_default()
                    .extend(found.addresses.get(family).into_iter().flatten());
            }
            let mut in_use = BTreeMap::new();
            let mut failed = None;
            for (index, addresses) in &by_link {
                let Some(link) = links.iter().find(|l| l.index == *index) else {
                    continue;
                };
                match probe::in_use(link, addresses, PROBE_WAIT).await {
                    Ok(found) => in_use.extend(found),
                    Err(e) => failed = Some(format!("cannot probe on {}: {e}", link.name)),
                }
            }
            match failed {
                Some(problem) => node_network::unresolvable(problem, &me),
                None => node_network::resolve(&pool, &found, &in_use, &me),
            }
        }
    };
    let _ = done
        .send(Resolved {
            pool: pool.pool,
            status,
        })
        .await;
}

/// Counts ownership changes, and times takeovers from peers declared down.
fn account(
    metrics: &Metrics,
    before: &BTreeMap<IpAddr, Vec<String>>,
    owners_before: &BTreeMap<IpAddr, Option<String>>,
    state: &Reported,
    down_at: &BTreeMap<String, StdInstant>,
) {
    let gained: Vec<&IpAddr> = state
        .owned
        .keys()
        .filter(|ip| !before.contains_key(*ip))
        .collect();
    let lost = before
        .keys()
        .filter(|ip| !state.owned.contains_key(*ip))
        .count();
    metrics
        .ownership_changes
        .inc_by((gained.len() + lost) as u64);
    for ip in gained {
        if let Some(Some(previous)) = owners_before.get(ip)
            && let Some(at) = down_at.get(previous)
        {
            metrics.failover_seconds.observe(at.elapsed().as_secs_f64());
        }
    }
}

/// What to report: every IP this node answers for (or holds back on every interface,
/// because another host answers for it there), and the IPs it answered for until now
/// that no node may announce any more.
fn ownership(
    plan: &NodePlan,
    state: &Reported,
    others: &Others,
    nodes_by_mac: &HashMap<[u8; 6], String>,
) -> Vec<Ownership> {
    let announced = plan.by_ip();
    let mut out: Vec<Ownership> = state
        .owned
        .iter()
        .map(|(ip, interfaces)| Ownership {
            ip: *ip,
            interfaces: interfaces.clone(),
            services: announced
                .get(ip)
                .map(|a| a.services.clone())
                .unwrap_or_default(),
            other: other_responder(*ip, interfaces, others, nodes_by_mac),
        })
        .collect();
    out.extend(state.orphans.iter().map(|(ip, services)| Ownership {
        ip: *ip,
        interfaces: Vec::new(),
        services: services.clone(),
        other: None,
    }));
    out
}

/// Another host that answers for `ip` where this node would announce it: held back when
/// it answered on every one of `interfaces` before this node announced there, else one
/// that answers too where this node announces it.
fn other_responder(
    ip: IpAddr,
    interfaces: &[String],
    others: &Others,
    nodes_by_mac: &HashMap<[u8; 6], String>,
) -> Option<OtherResponder> {
    let on: Vec<Option<&Other>> = interfaces
        .iter()
        .map(|name| others.get(&(ip, name.clone())))
        .collect();
    let held_everywhere = !on.is_empty() && on.iter().all(|o| o.is_some_and(|o| o.held));
    let other = if held_everywhere {
        on[0]
    } else {
        on.into_iter().flatten().find(|o| !o.held)
    }?;
    Some(OtherResponder {
        mac: crate::mac::format(&other.mac),
        node: nodes_by_mac.get(&other.mac).cloned(),
        held_back: other.held,
    })
}

/// Starts membership when it is configured and this node's Node object says where to
/// bind; otherwise says why and runs without it (retried when the objects change).
async fn join(manifests: &Manifests, opts: &Options, links: &[Link]) -> Option<Cluster> {
    let settings = opts.cluster.clone()?;
    let subnets = interfaces::reachable_subnets(links);
    match Cluster::join(manifests, &opts.node_name, subnets, settings).await {
        Ok(c) => Some(c),
        Err(e) => {
            error!("{e:#}; announcing nothing until membership can start");
            None
        }
    }
}

async fn withdraw(
    mut responder: Responder,
    forwarder: &Forwarder,
    state: &Reported,
    cluster: Option<Cluster>,
) -> anyhow::Result<()> {
    // Peers learn we are gone first, so the new owners announce while we withdraw.
    if let Some(mut c) = cluster {
        c.leave().await;
    }
    responder.shutdown().await;
    if let Err(e) = forwarder.remove() {
        error!(error = %e, "cannot remove the nftables table inet ferrolb");
    }
    info!(
        ips = state.owned.len(),
        "withdrew every announcement and forwarding rule; exiting"
    );
    Ok(())
}

/// What was last logged, so that each change is logged once.
#[derive(Default)]
struct Reported {
    problems: BTreeSet<String>,
    owned: BTreeMap<IpAddr, Vec<String>>,
    forwards: Vec<ForwardRule>,
    /// Who owned each IP at the last reconcile, to tell a takeover from a first start.
    owners: BTreeMap<IpAddr, Option<String>>,
    /// IPs this node announced last and that no node may announce now: reported as such
    /// until a node may again, or the IP goes.
    orphans: BTreeMap<IpAddr, Vec<ferrolb_allocator::ServiceKey>>,
    /// What was last said of the kernel answering ARP for VIPs ([`kernel_arp`]).
    kernel_said: Option<String>,
}

impl Reported {
    fn report(&mut self, plan: &NodePlan) {
        let problems: BTreeSet<String> = plan.problems.iter().cloned().collect();
        for p in problems.difference(&self.problems) {
            warn!("{p}");
        }
        self.problems = problems;
    }

    fn problem(&mut self, text: String) {
        if self.problems.insert(text.clone()) {
            warn!("{text}");
        }
    }
}

/// Which link answers for which IP, from the plan and the links that exist now.
fn link_specs(plan: &NodePlan, node: &str, links: &[Link], state: &mut Reported) -> Vec<LinkSpec> {
    let mut specs: BTreeMap<u32, LinkSpec> = BTreeMap::new();
    let mut owned: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for a in &plan.announcements {
        let selection = interfaces::select(links, a.ip, &a.interfaces);
        for p in selection.problems {
            state.problem(format!(
                "{} (L2Advertisement {}): {p}",
                a.ip,
                a.advertisements.join(", ")
            ));
        }
        for index in selection.links {
            let Some(link) = links.iter().find(|l| l.index == index) else {
                continue;
            };
            let Some(mac) = link.mac else { continue };
            let spec = specs.entry(index).or_insert_with(|| LinkSpec {
                index,
                name: link.name.clone(),
                mac,
                ips: BTreeSet::new(),
                takeovers: BTreeSet::new(),
                gratuitous: BTreeMap::new(),
            });
            spec.ips.insert(a.ip);
            if a.gratuitous != Gratuitous::default() {
                spec.gratuitous.insert(a.ip, a.gratuitous);
            }
            let before = state.owners.get(&a.ip).cloned().flatten();
            if before.is_some_and(|b| b != node) {
                spec.takeovers.insert(a.ip);
            }
            owned.entry(a.ip).or_default().push(link.name.clone());
        }
    }
    let announced = plan.by_ip();
    for (ip, names) in &owned {
        if state.owned.get(ip) != Some(names) {
            let services: Vec<String> = announced
                .get(ip)
                .into_iter()
                .flat_map(|a| a.services.iter().map(ToString::to_string))
                .collect();
            info!(ip = %ip, interfaces = %names.join(","), services = %services.join(","), "this node owns the IP");
        }
    }
    for ip in state.owned.keys().filter(|ip| !owned.contains_key(ip)) {
        let to = plan
            .owners
            .get(ip)
            .cloned()
            .flatten()
            .unwrap_or_else(|| "no node".into());
        info!(ip = %ip, new_owner = %to, "this node no longer owns the IP");
    }
    state.owned = owned;
    state.owners = plan.owners.clone();
    specs.into_values().collect()
}
