//! What one node announces: from the declared objects to the IPs this node owns, the
//! interfaces chosen for them and the NodePort forwarding rules. Pure.
//!
//! Steps, the same on every node so that all agree without talking:
//! 1. The IPs: in a cluster, what the controller wrote in each Service's
//!    `status.loadBalancer.ingress` ([`Addresses::FromStatus`]), but only IPs that lie in
//!    an IPAddressPool (never an arbitrary address someone wrote there); in standalone mode, the
//!    controller's allocator over the declared pools and Services
//!    ([`Addresses::Allocated`]; a status in the files is kept when valid).
//! 2. The L2Advertisements that announce each IP's pool (by name, by pool selector, or
//!    every pool when the advertisement names none). An IP no advertisement covers is not
//!    announced.
//! 3. The eligible nodes: matching the advertisement's `nodeSelectors`, not labelled
//!    `node.kubernetes.io/exclude-from-external-load-balancers` nor `ferrolb.io/drain`,
//!    not NotReady, and, for an
//!    IP of an `externalTrafficPolicy: Local` Service, holding a ready endpoint of it.
//! 4. The owner: [`election::elect`] among the eligible nodes membership says are alive,
//!    ranked by what membership says of them and by the priority the advertisements
//!    give them ([`priority`]). [`plan`] does steps 2 and 3 once per pool and step 4 in
//!    one pass per IP: it runs after every change, for IPs × nodes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_allocator::input;
use ferrolb_allocator::{self as allocator, Outcome, ServiceKey};
use ferrolb_api::manifests::Manifests;
use ferrolb_api::selector::{self, Labels};
use ferrolb_api::{Family, Forwarding, Gratuitous, L2Advertisement};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use crate::election::{self, Candidate, ClusterView};
use crate::forwarding::{self, ForwardRule, Protocol};
use ipnetwork::IpNetwork;

/// The label Kubernetes uses to keep a node out of load balancing.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The label `ferrolb drain` puts on a node before maintenance: its IPs move away, as
/// with [`EXCLUDE_LABEL`], which stays the user's own to set (so `ferrolb drain --undo`
/// never removes what someone else put there).
pub const DRAIN_LABEL: &str = "ferrolb.io/drain";

/// The label naming the Service an EndpointSlice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One IP this node announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    pub ip: IpAddr,
    /// Interfaces named by the advertisements; empty means the default rule
    /// (see [`crate::interfaces::select`]).
    pub interfaces: Vec<String>,
    /// The L2Advertisements that announce it, for messages.
    pub advertisements: Vec<String>,
    pub services: Vec<ServiceKey>,
    /// Their gratuitous ARP / NA policy, merged (unset fields: the speaker's defaults).
    pub gratuitous: Gratuitous,
}

/// Everything the speaker of `node` must do, and what it should tell the user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodePlan {
    pub announcements: Vec<Announcement>,
    pub forwards: Vec<ForwardRule>,
    /// Owner of every announced IP in the cluster (None: no eligible node), for logs.
    pub owners: BTreeMap<IpAddr, Option<String>>,
    /// Problems with the input, each naming the object (and file, for manifests).
    pub problems: Vec<String>,
    /// IPs no node may announce now (no eligible node), with their Services.
    pub orphans: BTreeMap<IpAddr, Vec<ServiceKey>>,
}

impl NodePlan {
    /// Each announcement by its IP (a plan announces an IP once).
    pub fn by_ip(&self) -> BTreeMap<IpAddr, &Announcement> {
        self.announcements.iter().map(|a| (a.ip, a)).collect()
    }
}

/// The owner of `ip` among `candidates`, and, when its traffic is forwarded and `node`
/// does not own it, the node that would take it over: that node holds the forwarding
/// rules too, so a takeover forwards as soon as it announces, with no `nft` run in
/// between (rules on a node the IP's traffic does not reach do nothing).
fn owner_and_standby<'a>(
    ip: IpAddr,
    candidates: &[Candidate<'a>],
    node: &str,
    forwarded: bool,
) -> (Option<&'a str>, Option<&'a str>) {
    let owner = election::elect(ip, candidates);
    let standby = match owner {
        Some(o) if forwarded && o != node => election::runner_up(ip, candidates, o),
        _ => None,
    };
    (owner, standby)
}

/// Where the IPs to announce come from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Addresses {
    /// Standalone: the allocator over the declared pools and Services (each new Service
    /// starts at a point of its pool hashed from its name: no status to remember).
    #[default]
    Allocated,
    /// In a cluster: the IPs the controller wrote in Service status, and no others. A
    /// Service the controller has not served yet is not announced, and an IP that a pool
    /// change stranded keeps being announced while it lies in a pool, as the controller
    /// keeps it; an IP in no pool (its pool deleted or shrunk, or written by someone
    /// else) is not announced. `class` is the
    /// `loadBalancerClass` served besides none, as the controller is told.
    FromStatus { class: String },
}

/// What `node` announces in standalone mode. See [`plan`].
pub fn plan_node(m: &Manifests, node: &str, view: &ClusterView) -> NodePlan {
    plan(m, node, view, &Addresses::Allocated)
}

/// What `node` announces, given every declared object and what membership says.
pub fn plan(m: &Manifests, node: &str, view: &ClusterView, addresses: &Addresses) -> NodePlan {
    let mut out = NodePlan::default();
    let (services, by_ip) = match addresses {
        Addresses::Allocated => allocated(m, &mut out),
        Addresses::FromStatus { class } => from_status(m, class, &mut out),
    };

    let Some(me) = m
        .nodes
        .iter()
        .find(|n| n.object.metadata.name.as_deref() == Some(node))
    else {
        out.problems.push(format!(
            "node {node:?} is not among the Node objects read; this speaker announces nothing"
        ));
        return out;
    };
    let nodes: Vec<&Node> = m.nodes.iter().map(|n| &*n.object).collect();
    let pool_labels: BTreeMap<&str, Labels> = m
        .pools
        .iter()
        .map(|p| {
            (
                p.object.metadata.name.as_deref().unwrap_or_default(),
                p.object.metadata.labels.clone().unwrap_or_default(),
            )
        })
        .collect();
    // Each Service's slices, looked up once per Local Service rather than searched.
    let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &m.endpoint_slices {
        let meta = &s.object.metadata;
        if let Some(service) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) {
            let namespace = meta.namespace.as_deref().unwrap_or("default");
            slices
                .entry((namespace, service.as_str()))
                .or_default()
                .push(&*s.object);
        }
    }
    let no_slices = Vec::new();
    let mut ballots: BTreeMap<String, Ballot> = BTreeMap::new();

    for (ip, (pool, keys)) in by_ip {
        let ballot = ballots
            .entry(pool.clone())
            .or_insert_with(|| Ballot::new(m, &nodes, view, &pool, pool_labels.get(pool.as_str())));
        let advs = &ballot.advs;
        if advs.is_empty() {
            let names: Vec<String> = keys.iter().map(ToString::to_string).collect();
            out.problems.push(format!(
                "{ip} ({}) is in pool {pool:?}, which no L2Advertisement announces",
                names.join(", ")
            ));
            continue;
        }
        let local: Vec<&Service> = keys
            .iter()
            .map(|k| services[k])
            .filter(|s| {
                s.spec
                    .as_ref()
                    .and_then(|s| s.external_traffic_policy.as_deref())
                    == Some("Local")
            })
            .collect();
        let forwarded = advs
            .iter()
            .any(|a| a.spec.forwarding == Forwarding::NodePort);
        let elect = |candidates| owner_and_standby(ip, candidates, node, forwarded);
        let (owner, standby) = if local.is_empty() {
            elect(&ballot.candidates)
        } else {
            // The pool's candidates that hold a ready endpoint of every Local Service on
            // the IP: found from the endpoints (a few) rather than by asking each node.
            let mut with_endpoints: Option<BTreeSet<&str>> = None;
            for s in &local {
                let key = (
                    s.metadata.namespace.as_deref().unwrap_or("default"),
                    s.metadata.name.as_deref().unwrap_or_default(),
                );
                let here: BTreeSet<&str> =
                    ready_endpoints(slices.get(&key).unwrap_or(&no_slices), s)
                        .filter_map(|e| e.node_name.as_deref())
                        .collect();
                with_endpoints = Some(match with_endpoints {
                    None => here,
                    Some(before) => before.intersection(&here).copied().collect(),
                });
            }
            let candidates: Vec<Candidate> = with_endpoints
                .unwrap_or_default()
                .into_iter()
                .filter_map(|n| ballot.index.get(n).map(|&i| ballot.candidates[i]))
                .collect();
            elect(&candidates)
        };
        out.owners.insert(ip, owner.map(str::to_string));
        if owner.is_none() {
            out.orphans.insert(ip, keys.clone());
        }
        if forwarded && (owner == Some(node) || standby == Some(node)) {
            // The owner reports what is wrong with the rules; the standby holds them.
            let mut unreported = Vec::new();
            let problems = if owner == Some(node) {
                &mut out.problems
            } else {
                &mut unreported
            };
            match internal_ip(&me.object, Family::of(ip)) {
                Some(node_ip) => {
                    for key in &keys {
                        out.forwards.extend(forward_rules(
                            ip,
                            node_ip,
                            services[key],
                            key,
                            problems,
                        ));
                    }
                }
                None => problems.push(format!(
                    "{}: node {node:?} has no {} InternalIP in status.addresses, so {ip} cannot be forwarded to its NodePorts",
                    me.origin,
                    Family::of(ip)
                )),
            }
        }
        if owner != Some(node) {
            continue;
        }
        let mut interfaces: BTreeSet<String> = BTreeSet::new();
        let default_rule = advs.iter().any(|a| a.spec.interfaces.is_empty());
        if !default_rule {
            interfaces.extend(advs.iter().flat_map(|a| a.spec.interfaces.iter().cloned()));
        }
        out.announcements.push(Announcement {
            ip,
            interfaces: interfaces.into_iter().collect(),
            advertisements: advs
                .iter()
                .filter_map(|a| a.metadata.name.clone())
                .collect(),
            services: keys,
            gratuitous: advs
                .iter()
                .filter_map(|a| a.spec.gratuitous)
                .fold(Gratuitous::default(), Gratuitous::most),
        });
    }
    out.forwards.sort();
    out.forwards.dedup();
    out
}

/// What decides the owners of one pool's IPs, worked out once per pool: the
/// advertisements that announce it, and the nodes they allow (step 3 but for
/// endpoints), resolved against membership with their priorities.
struct Ballot<'a> {
    advs: Vec<&'a L2Advertisement>,
    candidates: Vec<Candidate<'a>>,
    /// Position in `candidates` by node name.
    index: BTreeMap<&'a str, usize>,
}

impl<'a> Ballot<'a> {
    fn new(
        m: &'a Manifests,
        nodes: &[&'a Node],
        view: &'a ClusterView,
        pool: &str,
        pool_labels: Option<&Labels>,
    ) -> Ballot<'a> {
        let advs = advertising(m, pool, pool_labels);
        let no_labels = Labels::new();
        let candidates = view.resolve(
            nodes
                .iter()
                .filter(|n| ineligible(n, &advs).is_none())
                .filter_map(|n| {
                    let labels = n.metadata.labels.as_ref().unwrap_or(&no_labels);
                    Some((n.metadata.name.as_deref()?, priority(&advs, labels)))
                }),
        );
        let index = candidates
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name, i))
            .collect();
        Ballot {
            advs,
            candidates,
            index,
        }
    }
}

/// IP -> (its pool, the Services holding it).
type ByIp = BTreeMap<IpAddr, (String, Vec<ServiceKey>)>;

/// Standalone: run the allocator; its problems become the plan's.
fn allocated<'m>(
    m: &'m Manifests,
    out: &mut NodePlan,
) -> (BTreeMap<ServiceKey, &'m Service>, ByIp) {
    let prepared = input::prepare(m);
    // No status to remember in standalone mode: each Service starts at its own point.
    let allocation = prepared.plan(allocator::Start::Hashed);
    out.problems = prepared.problems;
    let services = prepared.services;
    for (key, outcome) in &allocation.services {
        if let Outcome::Pending { reason, .. } = outcome {
            out.problems.push(format!(
                "{} (Service \"{key}\"): no IP, so nothing is announced for it: {reason}",
                services[key].origin
            ));
        }
    }
    let mut by_ip = ByIp::new();
    for (key, outcome) in &allocation.services {
        for a in outcome.assignments() {
            by_ip
                .entry(a.ip)
                .or_insert_with(|| (a.pool.clone(), vec![]))
                .1
                .push(key.clone());
        }
    }
    let services = services.into_iter().map(|(k, l)| (k, &*l.object)).collect();
    (services, by_ip)
}

/// In a cluster: the IPs in status of every Service that is ferrolb's, valid or not (the
/// controller keeps an invalid Service's IPs, so they stay announced), as long as they
/// lie in an IPAddressPool ([`input::pool_of`], the allocator's rule). Status is
/// writable by whoever may patch `services/status`, not only by the controller: an IP in
/// no pool is one the allocator would never have handed out, so it is never announced,
/// or anyone able to write a status could make the speakers claim any address on the
/// segment (a router's, another host's). Other problems with pools and Services are the
/// controller's to report.
fn from_status<'m>(
    m: &'m Manifests,
    class: &str,
    out: &mut NodePlan,
) -> (BTreeMap<ServiceKey, &'m Service>, ByIp) {
    let pools: Vec<ferrolb_api::IPAddressPool> =
        m.pools.iter().map(|p| (*p.object).clone()).collect();
    let (configs, _) = input::pool_configs(&pools);
    let mut services = BTreeMap::new();
    let mut by_ip = ByIp::new();
    for located in &m.services {
        let svc = &located.object;
        if !input::is_ours_for_class(svc, class) {
            continue;
        }
        let key = input::service_key(svc);
        for ip in ferrolb_allocator::input::ingress_ips(svc) {
            let Some(pool) = input::pool_of(&configs, ip) else {
                out.problems.push(format!(
                    "{ip} in the status of Service \"{key}\" is in no IPAddressPool; it is not announced"
                ));
                continue;
            };
            by_ip
                .entry(ip)
                .or_insert_with(|| (pool.name.clone(), vec![]))
                .1
                .push(key.clone());
        }
        services.insert(key, &**svc);
    }
    (services, by_ip)
}

/// Whether `adv` announces the IPs of `pool` (whose labels are `labels`).
pub fn announces_pool(adv: &L2Advertisement, pool: &str, labels: Option<&Labels>) -> bool {
    let spec = &adv.spec;
    if spec.ip_address_pools.is_empty() && spec.ip_address_pool_selectors.is_empty() {
        return true;
    }
    spec.ip_address_pools.iter().any(|p| p == pool)
        || labels.is_some_and(|l| selector::any_matches(&spec.ip_address_pool_selectors, l))
}

/// The L2Advertisements that announce `pool` (whose labels are `labels`).
pub fn advertising<'m>(
    m: &'m Manifests,
    pool: &str,
    labels: Option<&Labels>,
) -> Vec<&'m L2Advertisement> {
    m.l2_advertisements
        .iter()
        .map(|a| &*a.object)
        .filter(|a| announces_pool(a, pool, labels))
        .collect()
}

/// The priority `advs` give a node labelled `labels`: the highest of their
/// `nodePriorities` entries that match it, 0 when none does.
pub fn priority(advs: &[&L2Advertisement], labels: &Labels) -> i32 {
    advs.iter()
        .flat_map(|a| &a.spec.node_priorities)
        .filter(|p| selector::matches(&p.node_selector, labels))
        .map(|p| p.priority)
        .max()
        .unwrap_or(0)
}

/// Why a node may not announce the IPs of some advertisements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ineligible {
    /// Labelled [`EXCLUDE_LABEL`].
    Excluded,
    /// Labelled [`DRAIN_LABEL`].
    Drained,
    NotReady,
    /// No advertisement's `nodeSelectors` match it.
    NotSelected,
    /// For an `externalTrafficPolicy: Local` Service: no ready endpoint on the node.
    NoLocalEndpoint,
}

impl std::fmt::Display for Ineligible {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ineligible::Excluded => write!(f, "labelled {EXCLUDE_LABEL}"),
            Ineligible::Drained => write!(
                f,
                "drained for maintenance (label {DRAIN_LABEL}; `ferrolb drain --undo` lifts it)"
            ),
            Ineligible::NotReady => f.write_str("NotReady"),
            Ineligible::NotSelected => {
                f.write_str("not matched by the L2Advertisement's nodeSelectors")
            }
            Ineligible::NoLocalEndpoint => {
                f.write_str("no ready endpoint here (externalTrafficPolicy: Local)")
            }
        }
    }
}

/// Why `node` may not announce the IPs of `advs`, if it may not; the endpoint rule of
/// `externalTrafficPolicy: Local` is [`has_ready_endpoint`], asked by the caller.
pub fn ineligible(node: &Node, advs: &[&L2Advertisement]) -> Option<Ineligible> {
    let no_labels = Labels::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&no_labels);
    if labels.contains_key(EXCLUDE_LABEL) {
        return Some(Ineligible::Excluded);
    }
    if labels.contains_key(DRAIN_LABEL) {
        return Some(Ineligible::Drained);
    }
    let not_ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status != "True");
    if not_ready {
        return Some(Ineligible::NotReady);
    }
    let selected = advs.iter().any(|a| {
        a.spec.node_selectors.is_empty() || selector::any_matches(&a.spec.node_selectors, labels)
    });
    (!selected).then_some(Ineligible::NotSelected)
}

/// Whether an EndpointSlice of the Service lists a ready endpoint on `node`.
pub fn has_ready_endpoint(slices: &[&EndpointSlice], svc: &Service, node: &str) -> bool {
    ready_endpoints(slices, svc).any(|e| e.node_name.as_deref() == Some(node))
}

/// The endpoints of the Service that its EndpointSlices list as ready: what kube-proxy
/// sends traffic to (a missing `ready` means ready, as the API defines).
pub fn ready_endpoints<'a>(
    slices: &'a [&'a EndpointSlice],
    svc: &'a Service,
) -> impl Iterator<Item = &'a Endpoint> + 'a {
    let name = svc.metadata.name.as_ref();
    let namespace = svc.metadata.namespace.as_deref().unwrap_or("default");
    slices
        .iter()
        .copied()
        .filter(move |s| {
            s.metadata.namespace.as_deref().unwrap_or("default") == namespace
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                    == name
        })
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
}

pub(crate) fn internal_ip(node: &Node, family: Family) -> Option<IpAddr> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .find(|ip| Family::of(*ip) == family)
}

/// The clients `spec.loadBalancerSourceRanges` lets in, read as kube-proxy reads it:
/// CIDRs (host bits ignored); an entry that is not one is skipped and reported.
fn allowed_sources(svc: &Service, key: &ServiceKey, problems: &mut Vec<String>) -> Vec<IpNetwork> {
    let ranges = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_source_ranges.as_ref())
        .into_iter()
        .flatten();
    let mut nets = Vec::new();
    for (i, text) in ranges.enumerate() {
        match text.trim().parse::<IpNetwork>() {
            Ok(net) => nets.push(net),
            Err(_) => problems.push(format!(
                "Service \"{key}\": spec.loadBalancerSourceRanges[{i}] {text:?} is not a CIDR; it is ignored"
            )),
        }
    }
    nets
}

fn forward_rules(
    vip: IpAddr,
    node_ip: IpAddr,
    svc: &Service,
    key: &ServiceKey,
    problems: &mut Vec<String>,
) -> Vec<ForwardRule> {
    let sources = forwarding::source_ranges(vip, &allowed_sources(svc, key, problems));
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let without: Vec<String> = ports
        .iter()
        .filter(|p| p.node_port.is_none())
        .map(|p| p.port.to_string())
        .collect();
    if !without.is_empty() {
        let why = if svc
            .spec
            .as_ref()
            .and_then(|s| s.allocate_load_balancer_node_ports)
            == Some(false)
        {
            "it sets allocateLoadBalancerNodePorts: false"
        } else {
            "the API server has not given them one (yet)"
        };
        problems.push(format!(
            "Service \"{key}\": port(s) {} of {vip} have no NodePort ({why}), so forwarding: nodePort \
             does not carry them; kube-proxy (or your CNI) must handle the VIP on the announcing node",
            without.join(", ")
        ));
    }
    ports
        .iter()
        .filter_map(|p| {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Protocol::Tcp,
                "UDP" => Protocol::Udp,
                _ => return None,
            };
            Some(ForwardRule {
                vip,
                port: u16::try_from(p.port).ok()?,
                protocol,
                node_ip,
                node_port: u16::try_from(p.node_port?).ok()?,
                sources: sources.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {zone: a}}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2, labels: {zone: b}}
status: {addresses: [{type: InternalIP, address: 10.0.0.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: n3, labels: {zone: b}}
status: {addresses: [{type: InternalIP, address: 10.0.0.3}]}
"#;

    const POOL: &str = r#"
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata: {name: p}
spec: {addresses: [192.0.2.200-192.0.2.209]}
"#;

    fn manifests(extra: &str) -> Manifests {
        let mut m = Manifests::default();
        let errors = m.add_text("test.yaml", &format!("{NODES}---{POOL}---\n{extra}"));
        assert!(errors.is_empty(), "{errors:?}");
        m
    }

    fn adv(spec: &str) -> String {
        format!(
            "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: adv}}\nspec: {spec}\n"
        )
    }

    fn svc(extra_spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
             spec: {{type: LoadBalancer, ports: [{{port: 80, nodePort: 30080}}], selector: {{app: web}}{extra_spec}}}\n"
        )
    }

    /// Which node announces, according to each node's own plan.
    fn announcers(m: &Manifests) -> Vec<String> {
        announcers_in(m, &ClusterView::everyone())
    }

    fn announcers_in(m: &Manifests, view: &ClusterView) -> Vec<String> {
        ["n1", "n2", "n3"]
            .into_iter()
            .filter(|n| !plan_node(m, n, view).announcements.is_empty())
            .map(String::from)
            .collect()
    }

    #[test]
    fn exactly_one_node_announces_and_all_agree_on_it() {
        let m = manifests(&format!("{}---\n{}", adv("{}"), svc("")));
        let announcers = announcers(&m);
        assert_eq!(announcers.len(), 1);
        for node in ["n1", "n2", "n3"] {
            let plan = plan_node(&m, node, &ClusterView::everyone());
            let owner = plan.owners.values().next().cloned().flatten();
            assert_eq!(
                owner.as_deref(),
                Some(announcers[0].as_str()),
                "{node} disagrees"
            );
        }
    }

    #[test]
    fn node_selectors_and_the_exclude_label_and_not_ready_limit_the_candidates() {
        let m = manifests(&format!(
            "{}---\n{}",
            adv("{nodeSelectors: [{matchLabels: {zone: a}}]}"),
            svc("")
        ));
        assert_eq!(announcers(&m), ["n1"]);

        let excluded = NODES.replace(
            "labels: {zone: a}",
            "labels: {zone: a, node.kubernetes.io/exclude-from-external-load-balancers: \"\"}",
        );
        let mut m = Manifests::default();
        m.add_text(
            "t.yaml",
            &format!(
                "{excluded}---{POOL}---\n{}---\n{}",
                adv("{nodeSelectors: [{matchLabels: {zone: a}}]}"),
                svc("")
            ),
        );
        assert_eq!(
            announcers(&m),
            Vec::<String>::new(),
            "the only matching node is excluded"
        );

        let not_ready = NODES.replace(
            "status: {addresses: [{type: InternalIP, address: 10.0.0.1}]}",
            "status: {addresses: [{type: InternalIP, address: 10.0.0.1}], conditions: [{type: Ready, status: \"False\"}]}",
        );
        let mut m = Manifests::default();
        m.add_text(
            "t.yaml",
            &format!(
                "{not_ready}---{POOL}---\n{}---\n{}",
                adv("{nodeSelectors: [{matchLabels: {zone: a}}]}"),
                svc("")
            ),
        );
        assert_eq!(
            announcers(&m),
            Vec::<String>::new(),
            "the only matching node is NotReady"
        );
    }

    #[test]
    fn local_traffic_is_announced_only_where_a_ready_endpoint_runs() {
        let slice = |node: &str, ready: bool| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: web-{node}, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv4\nendpoints: [{{addresses: [10.1.0.1], nodeName: {node}, conditions: {{ready: {ready}}}}}]\n"
            )
        };
        let local = ", externalTrafficPolicy: Local";
        let m = manifests(&format!(
            "{}---\n{}---\n{}---\n{}",
            adv("{}"),
            svc(local),
            slice("n3", true),
            slice("n2", false)
        ));
        assert_eq!(announcers(&m), ["n3"]);
        let m = manifests(&format!("{}---\n{}", adv("{}"), svc(local)));
        assert_eq!(
            announcers(&m),
            Vec::<String>::new(),
            "no endpoint anywhere: nobody"
        );
        assert_eq!(
            plan_node(&m, "n1", &ClusterView::everyone())
                .owners
                .values()
                .next(),
            Some(&None)
        );
    }

    #[test]
    fn forwarding_rules_follow_the_owner_and_use_its_internal_ip() {
        let m = manifests(&format!(
            "{}---\n{}",
            adv("{forwarding: nodePort}"),
            svc("")
        ));
        let owner = &announcers(&m)[0];
        let plan = plan_node(&m, owner, &ClusterView::everyone());
        assert_eq!(plan.forwards.len(), 1);
        let rule = plan.forwards[0].clone();
        assert_eq!(
            (rule.port, rule.node_port, rule.protocol),
            (80, 30080, Protocol::Tcp)
        );
        let want_ip = format!("10.0.0.{}", &owner[1..]);
        assert_eq!(rule.node_ip.to_string(), want_ip);
        // The node a failover would give the IP to holds the same rule to its own
        // NodePort; the third node holds none.
        let others: Vec<&str> = ["n1", "n2", "n3"]
            .into_iter()
            .filter(|n| n != owner)
            .collect();
        let gone = ClusterView {
            members: Some(
                others
                    .iter()
                    .map(|n| {
                        (
                            n.to_string(),
                            crate::election::MemberView {
                                settled: true,
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
            ),
        };
        let next = &announcers_in(&m, &gone)[0];
        for other in others {
            let forwards = plan_node(&m, other, &ClusterView::everyone()).forwards;
            if other == next {
                assert_eq!(forwards.len(), 1, "{other}, the standby");
                assert_eq!(
                    forwards[0].node_ip.to_string(),
                    format!("10.0.0.{}", &other[1..])
                );
            } else {
                assert!(forwards.is_empty(), "{other}: {forwards:?}");
            }
        }
        let m = manifests(&format!("{}---\n{}", adv("{}"), svc("")));
        assert!(
            plan_node(&m, owner, &ClusterView::everyone())
                .forwards
                .is_empty(),
            "forwarding: none"
        );
    }

    #[test]
    fn problems_name_what_the_user_must_fix() {
        let m = manifests(&svc(""));
        let plan = plan_node(&m, "n1", &ClusterView::everyone());
        assert!(plan.announcements.is_empty());
        assert!(
            plan.problems
                .iter()
                .any(|p| p.contains("in pool \"p\", which no L2Advertisement announces")),
            "{:?}",
            plan.problems
        );

        let requested = svc("").replace(
            "namespace: shop}",
            "namespace: shop, annotations: {ferrolb.io/loadBalancerIPs: 198.51.100.1}}",
        );
        let m = manifests(&format!("{}---\n{requested}", adv("{}")));
        let plan = plan_node(&m, "n1", &ClusterView::everyone());
        assert!(
            plan.problems.iter().any(|p| p
                .starts_with("test.yaml, document 6 (Service \"shop/web\")")
                && p.contains("requested 198.51.100.1 is in no pool")),
            "{:?}",
            plan.problems
        );

        let plan = plan_node(&m, "n9", &ClusterView::everyone());
        assert!(
            plan.problems
                .iter()
                .any(|p| p.contains("node \"n9\" is not among the Node objects"))
        );
    }

    /// Status is writable by more than the controller: an IP written there that lies in
    /// no pool is not announced, even by an advertisement that names no pool (which
    /// announces every pool, not every address).
    #[test]
    fn a_status_ip_in_no_pool_is_never_announced() {
        let with_status = |ip: &str| {
            svc("").replace(
                "selector: {app: web}}",
                &format!(
                    "selector: {{app: web}}}}\nstatus: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}"
                ),
            )
        };
        let from_status = Addresses::FromStatus {
            class: "ferrolb.io/lb".into(),
        };
        let announced = |m: &Manifests| -> Vec<(String, IpAddr)> {
            ["n1", "n2", "n3"]
                .into_iter()
                .flat_map(|n| {
                    plan(m, n, &ClusterView::everyone(), &from_status)
                        .announcements
                        .into_iter()
                        .map(move |a| (n.to_string(), a.ip))
                })
                .collect()
        };
        // In the pool: announced by one node.
        let m = manifests(&format!("{}---\n{}", adv("{}"), with_status("192.0.2.203")));
        let got = announced(&m);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].1, "192.0.2.203".parse::<IpAddr>().unwrap());
        // In no pool (say, the segment's router): announced by nobody, and said so.
        for spec in ["{}", "{ipAddressPools: [p]}"] {
            let m = manifests(&format!("{}---\n{}", adv(spec), with_status("192.0.2.1")));
            assert_eq!(announced(&m), vec![], "advertisement {spec}");
            let plan = plan(&m, "n1", &ClusterView::everyone(), &from_status);
            assert!(
                plan.problems.iter().any(|p| p
                    == "192.0.2.1 in the status of Service \"shop/web\" is in no IPAddressPool; it is not announced"),
                "{:?}",
                plan.problems
            );
            assert!(plan.owners.is_empty(), "{:?}", plan.owners);
        }
    }

    /// `spec.loadBalancerSourceRanges` travels into the rules, in the VIP's family only;
    /// an entry that is no CIDR is reported by name.
    #[test]
    fn source_ranges_limit_the_forwarding_rules() {
        let m = manifests(&format!(
            "{}---\n{}",
            adv("{forwarding: nodePort}"),
            svc(
                ", loadBalancerSourceRanges: [10.0.0.0/8, 192.0.2.7/24, \"2001:db8::/64\", nonsense]"
            )
        ));
        let owner = &announcers(&m)[0];
        let plan = plan_node(&m, owner, &ClusterView::everyone());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            plan.forwards[0].sources,
            [
                (ip("10.0.0.0"), ip("10.255.255.255")),
                (ip("192.0.2.0"), ip("192.0.2.255"))
            ]
        );
        assert!(
            plan.problems.iter().any(|p| p
                == "Service \"shop/web\": spec.loadBalancerSourceRanges[3] \"nonsense\" is not a CIDR; it is ignored"),
            "{:?}",
            plan.problems
        );
    }

    #[test]
    fn named_interfaces_are_passed_on() {
        let m = manifests(&format!(
            "{}---\n{}",
            adv("{interfaces: [eth1, eth0]}"),
            svc("")
        ));
        let owner = &announcers(&m)[0];
        assert_eq!(
            plan_node(&m, owner, &ClusterView::everyone()).announcements[0].interfaces,
            ["eth0", "eth1"]
        );
    }

    /// Two advertisements of one pool: each field of the policy announces most.
    #[test]
    fn gratuitous_policies_of_several_advertisements_merge() {
        let m = manifests(&format!(
            "{}---\n{}---\n{}",
            adv("{gratuitous: {count: 2, refreshSeconds: 60}}"),
            adv("{gratuitous: {count: 4, intervalMilliseconds: 50}}")
                .replace("name: adv", "name: other"),
            svc("")
        ));
        let owner = &announcers(&m)[0];
        assert_eq!(
            plan_node(&m, owner, &ClusterView::everyone()).announcements[0].gratuitous,
            Gratuitous {
                count: Some(4),
                interval_milliseconds: Some(50),
                refresh_seconds: Some(60),
            }
        );
    }

    /// Issue 23, item 5: the preferred nodes announce every IP while one of them can,
    /// by hash among equals; the others only when none can; a preferred node that has
    /// just come back waits for its hold-down like any other.
    #[test]
    fn preferred_nodes_announce_while_one_can() {
        let services: String = (0..10)
            .map(|i| svc("").replace("name: web", &format!("name: web{i}")))
            .collect::<Vec<_>>()
            .join("---\n");
        let m = manifests(&format!(
            "{}---\n{services}",
            adv("{nodePriorities: [{priority: 10, nodeSelector: {matchLabels: {zone: b}}}]}")
        ));
        let member = |settled: bool| crate::election::MemberView {
            subnets: vec![],
            settled,
            known: true,
            proxy_failing: false,
        };
        let view = |members: &[(&str, bool)]| ClusterView {
            members: Some(
                members
                    .iter()
                    .map(|(n, settled)| (n.to_string(), member(*settled)))
                    .collect(),
            ),
        };
        let owners = |v: &ClusterView| -> BTreeSet<String> {
            plan_node(&m, "n1", v)
                .owners
                .values()
                .map(|o| o.clone().unwrap_or_default())
                .collect()
        };
        let all = view(&[("n1", true), ("n2", true), ("n3", true)]);
        assert_eq!(
            owners(&all),
            BTreeSet::from(["n2".to_string(), "n3".to_string()]),
            "both zone-b nodes share the IPs; n1 has none"
        );
        assert_eq!(
            owners(&view(&[("n1", true), ("n3", true)])),
            BTreeSet::from(["n3".to_string()])
        );
        assert_eq!(
            owners(&view(&[("n1", true)])),
            BTreeSet::from(["n1".to_string()]),
            "no preferred node alive: the others announce"
        );
        assert_eq!(
            owners(&view(&[("n1", true), ("n2", false)])),
            BTreeSet::from(["n1".to_string()]),
            "a preferred node back moments ago waits for its hold-down"
        );
    }

    /// Issue 23, item 3: with allocateLoadBalancerNodePorts: false there is no NodePort
    /// to forward to: said, naming the Service and the ports, instead of silence.
    #[test]
    fn forwarding_without_node_ports_is_reported() {
        let m = manifests(&format!(
            "{}---\n{}",
            adv("{forwarding: nodePort}"),
            svc(", allocateLoadBalancerNodePorts: false").replace(", nodePort: 30080", "")
        ));
        let owner = &announcers(&m)[0];
        let plan = plan_node(&m, owner, &ClusterView::everyone());
        assert!(plan.forwards.is_empty());
        assert!(
            plan.problems
                .iter()
                .any(|p| p.starts_with("Service \"shop/web\": port(s) 80 of ")
                    && p.contains(
                        "have no NodePort (it sets allocateLoadBalancerNodePorts: false)"
                    )),
            "{:?}",
            plan.problems
        );
    }
}
