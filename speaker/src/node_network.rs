//! Resolving a `fromNodeNetwork` pool: the subnet the nodes are on, as configured on
//! their interfaces, and the highest addresses of it that nobody uses. Pure: the links,
//! the Nodes, what membership gossips, the default gateways and the answers heard on the
//! wire are given by the caller ([`crate::probe`] does the I/O).
//!
//! Steps, for each family the pool takes:
//! 1. The subnet: the prefix on this node's interface that carries its InternalIP. The
//!    controller could only guess it from the IP; the speaker reads it.
//! 2. Agreement: every node that may announce the pool is on that subnet (its
//!    InternalIP inside it, and its gossiped link subnets holding it when known). A node
//!    elsewhere makes the pool unresolvable, naming the node and where it is.
//! 3. Candidates, from the top down: never the network or broadcast address (IPv6: the
//!    subnet-router anycast address and the 128 reserved anycast addresses at the top,
//!    RFC 2526), a node's IP, a default gateway or an address of this node.
//! 4. After the probe: the highest `size` candidates nobody answered for.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferrolb_api::address::{from_u128, to_u128};
use ferrolb_api::manifests::Manifests;
use ferrolb_api::selector::Labels;
use ferrolb_api::{AddressEntry, Family, FromNodeNetwork, IPAddressPool, NodeNetworkStatus};
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;

use crate::announcements::{advertising, ineligible, internal_ip};
use crate::election::ClusterView;
use crate::interfaces::Link;

/// Addresses probed beyond the pool's size, so that a few taken ones need no second round.
pub const PROBE_MARGIN: usize = 16;

/// IPv6 addresses left free at the top of a subnet: the reserved subnet anycast
/// addresses of RFC 2526 (the highest 128 interface identifiers).
const IPV6_RESERVED_TOP: u128 = 128;

/// A pool this node must resolve now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub pool: String,
    pub spec: FromNodeNetwork,
    /// The nodes that may announce the pool: they must all be on the subnet.
    pub nodes: Vec<String>,
}

/// The `fromNodeNetwork` pools with no addresses yet whose resolver is `me`: the first
/// by name of the live nodes its L2Advertisements select. A pool no advertisement
/// announces is left alone (which nodes would have to agree is unknown).
pub fn to_resolve(m: &Manifests, me: &str, view: &ClusterView) -> Vec<Unresolved> {
    let mut out = Vec::new();
    for p in &m.pools {
        let pool: &IPAddressPool = &p.object;
        let Some(spec) = &pool.spec.from_node_network else {
            continue;
        };
        if spec.count().is_none() {
            continue; // Invalid: the controller says so on the pool.
        }
        // Addresses in spec (then the pool is invalid) or already resolved.
        if !pool.entries().1.is_empty() {
            continue;
        }
        let name = pool.metadata.name.clone().unwrap_or_default();
        let labels: Labels = pool.metadata.labels.clone().unwrap_or_default();
        let advs = advertising(m, &name, Some(&labels));
        if advs.is_empty() {
            continue;
        }
        let nodes: Vec<String> = m
            .nodes
            .iter()
            .map(|n| &*n.object)
            .filter(|n| ineligible(n, &advs).is_none())
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let resolver = nodes
            .iter()
            .filter(|n| view.members.as_ref().is_none_or(|ms| ms.contains_key(*n)))
            .min();
        if resolver.map(String::as_str) != Some(me) {
            continue;
        }
        out.push(Unresolved {
            pool: name,
            spec: spec.clone(),
            nodes,
        });
    }
    out
}

/// What to probe for one pool, and what was passed over on the way.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Candidates {
    /// The subnet of each family taken.
    pub subnets: Vec<IpNetwork>,
    /// Per family, from the top down: the addresses to probe.
    pub addresses: BTreeMap<Family, Vec<IpAddr>>,
    /// Addresses passed over before probing, with why, highest first.
    pub skipped: Vec<(IpAddr, String)>,
    /// The interface the subnet is on (where to probe), per family.
    pub links: BTreeMap<Family, u32>,
}

/// What the resolver knows besides the pool.
pub struct Network<'a> {
    pub me: &'a str,
    pub links: &'a [Link],
    /// Every Node, to find InternalIPs (all of them are passed over, not only the
    /// pool's nodes).
    pub nodes: &'a [&'a Node],
    pub view: &'a ClusterView,
    pub gateways: &'a [IpAddr],
}

/// Steps 1 to 3 for `pool`; an error says why the pool cannot be resolved.
pub fn candidates(pool: &Unresolved, net: &Network) -> Result<Candidates, String> {
    let node = |name: &str| {
        net.nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
    };
    let me = node(net.me).ok_or_else(|| format!("node {} has no Node object", net.me))?;
    let families: Vec<Family> = if pool.spec.families.is_empty() {
        [Family::V4, Family::V6]
            .into_iter()
            .filter(|f| internal_ip(me, *f).is_some())
            .collect()
    } else {
        let mut f = pool.spec.families.clone();
        f.sort();
        f.dedup();
        f
    };
    if families.is_empty() {
        return Err(format!("node {} has no InternalIP", net.me));
    }
    let taken: BTreeMap<IpAddr, String> = net
        .nodes
        .iter()
        .flat_map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            node_ips(n).into_iter().map(move |ip| (ip, name.clone()))
        })
        .collect();
    let own: BTreeSet<IpAddr> = net
        .links
        .iter()
        .flat_map(|l| l.addresses.iter().map(IpNetwork::ip))
        .collect();
    let mut out = Candidates::default();
    for family in families {
        let spelled = family.as_kubernetes();
        let ip = internal_ip(me, family)
            .ok_or_else(|| format!("node {} has no {spelled} InternalIP", net.me))?;
        let (link, subnet) = net
            .links
            .iter()
            .find_map(|l| {
                l.addresses
                    .iter()
                    .find(|a| a.ip() == ip)
                    .map(|a| (l.index, network_of(a)))
            })
            .ok_or_else(|| format!("{}'s InternalIP {ip} is on none of its interfaces", net.me))?;
        let mut elsewhere = Vec::new();
        for name in &pool.nodes {
            let Some(n) = node(name) else { continue };
            match internal_ip(n, family) {
                None => elsewhere.push(format!("{name} has no {spelled} InternalIP")),
                Some(theirs) if !subnet.contains(theirs) => {
                    elsewhere.push(format!("{name}'s InternalIP {theirs} is outside it"))
                }
                Some(_) => {}
            }
            let gossiped = net
                .view
                .members
                .as_ref()
                .and_then(|ms| ms.get(name))
                .filter(|m| m.known);
            if let Some(m) = gossiped
                && !m.subnets.contains(&subnet)
            {
                let theirs: Vec<String> = m
                    .subnets
                    .iter()
                    .filter(|s| Family::of(s.ip()) == family)
                    .map(ToString::to_string)
                    .collect();
                elsewhere.push(format!(
                    "{name}'s interfaces are on {}",
                    if theirs.is_empty() {
                        "no such subnet".to_string()
                    } else {
                        theirs.join(", ")
                    }
                ));
            }
        }
        if !elsewhere.is_empty() {
            return Err(format!(
                "the nodes do not share one {spelled} subnet: {} is on {subnet} ({}); {}",
                net.me,
                ip,
                elsewhere.join("; ")
            ));
        }
        let (first, last) = usable(&subnet);
        let size = pool.spec.count().unwrap_or(0);
        let wanted = size + PROBE_MARGIN;
        let mut picked = Vec::new();
        let mut at = last;
        while at >= first && picked.len() < wanted {
            let addr = from_u128(family, at);
            if let Some(name) = taken.get(&addr) {
                out.skipped
                    .push((addr, format!("InternalIP of node {name}")));
            } else if net.gateways.contains(&addr) {
                out.skipped.push((addr, "a default gateway".into()));
            } else if own.contains(&addr) {
                out.skipped
                    .push((addr, format!("an address of node {}", net.me)));
            } else {
                picked.push(addr);
            }
            if at == first {
                break;
            }
            at -= 1;
        }
        if picked.len() < size {
            return Err(format!(
                "{subnet} has {} usable addresses that are no node's or gateway's, fewer than spec.fromNodeNetwork.size {}",
                picked.len(),
                pool.spec.size
            ));
        }
        out.subnets.push(subnet);
        out.addresses.insert(family, picked);
        out.links.insert(family, link);
    }
    Ok(out)
}

/// Step 4: the status to write, given which candidates answered on the wire (and with
/// which MAC).
pub fn resolve(
    pool: &Unresolved,
    found: &Candidates,
    in_use: &BTreeMap<IpAddr, [u8; 6]>,
    me: &str,
) -> NodeNetworkStatus {
    let size = pool.spec.count().unwrap_or(0);
    let mut skipped = found.skipped.clone();
    let mut addresses = Vec::new();
    let mut problems = Vec::new();
    for (family, candidates) in &found.addresses {
        let mut free = Vec::new();
        for ip in candidates {
            if free.len() == size {
                break;
            }
            match in_use.get(ip) {
                Some(mac) => skipped.push((
                    *ip,
                    format!("answered on the wire by {}", crate::mac::format(mac)),
                )),
                None => free.push(*ip),
            }
        }
        if free.len() < size {
            problems.push(format!(
                "only {} of the {} {} addresses probed are free, fewer than spec.fromNodeNetwork.size {size}",
                free.len(),
                candidates.len(),
                family.as_kubernetes()
            ));
        }
        // Only what was passed over above the lowest address taken matters.
        if let Some(lowest) = free.last() {
            skipped.retain(|(ip, _)| Family::of(*ip) != *family || ip > lowest);
        }
        addresses.extend(ranges(&free));
    }
    // IPv4 first, each family from the top down.
    skipped.sort_by(|a, b| (Family::of(a.0), b.0).cmp(&(Family::of(b.0), a.0)));
    skipped.dedup();
    let mut status = NodeNetworkStatus {
        addresses,
        subnets: found.subnets.iter().map(ToString::to_string).collect(),
        skipped: skipped
            .into_iter()
            .map(|(ip, why)| format!("{ip}: {why}"))
            .collect(),
        resolved_by: me.to_string(),
        problem: None,
    };
    if !problems.is_empty() {
        status.addresses.clear();
        status.problem = Some(problems.join("; "));
    }
    status
}

/// A status that says only why the pool cannot be resolved.
pub fn unresolvable(problem: String, me: &str) -> NodeNetworkStatus {
    NodeNetworkStatus {
        resolved_by: me.to_string(),
        problem: Some(problem),
        ..Default::default()
    }
}

/// Resolved addresses that are now a node's InternalIP (a node joined on one): said in
/// the speaker's log, like a foreign responder; the address stays in the pool.
pub fn newly_taken(m: &Manifests) -> Vec<String> {
    let nodes: BTreeMap<IpAddr, String> = m
        .nodes
        .iter()
        .flat_map(|n| {
            let name = n.object.metadata.name.clone().unwrap_or_default();
            node_ips(&n.object)
                .into_iter()
                .map(move |ip| (ip, name.clone()))
        })
        .collect();
    let mut out = Vec::new();
    for p in &m.pools {
        let Some(status) = p.object.node_network() else {
            continue;
        };
        let pool = p.object.metadata.name.as_deref().unwrap_or_default();
        for entry in &status.addresses {
            let Ok(range) = ferrolb_api::address::parse_range(&entry.0) else {
                continue;
            };
            for (ip, node) in &nodes {
                if range.contains(*ip) {
                    out.push(format!(
                        "pool {pool:?} resolved {ip} from the node network, and node {node} now has it as its InternalIP: a Service given {ip} will not be announced while the node answers for it"
                    ));
                }
            }
        }
    }
    out
}

/// The default gateways in `/proc/net/route` (IPv4) and `/proc/net/ipv6_route` text.
pub fn gateways(route: &str, ipv6_route: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    // Iface Destination Gateway Flags ... Mask ...: hex, in host (little-endian) order.
    for line in route.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[1] != "00000000" || f[7] != "00000000" {
            continue;
        }
        if let Ok(g) = u32::from_str_radix(f[2], 16)
            && g != 0
        {
            out.push(IpAddr::V4(Ipv4Addr::from(g.swap_bytes())));
        }
    }
    // dest dest_len src src_len gateway metric refcnt use flags iface: hex, network order.
    for line in ipv6_route.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[1] != "00" || f[0].bytes().any(|b| b != b'0') {
            continue;
        }
        if let Ok(g) = u128::from_str_radix(f[4], 16)
            && g != 0
        {
            out.push(IpAddr::V6(Ipv6Addr::from(g)));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn node_ips(n: &Node) -> Vec<IpAddr> {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .collect()
}

fn network_of(a: &IpNetwork) -> IpNetwork {
    IpNetwork::new(a.network(), a.prefix()).unwrap_or(*a)
}

/// The first and last address a pool may take from `subnet`.
fn usable(subnet: &IpNetwork) -> (u128, u128) {
    let network = to_u128(subnet.network());
    let bits: u32 = match subnet {
        IpNetwork::V4(_) => 32,
        IpNetwork::V6(_) => 128,
    };
    let host_bits = bits - u32::from(subnet.prefix());
    let last = if host_bits >= 128 {
        u128::MAX
    } else {
        network | ((1u128 << host_bits) - 1)
    };
    match subnet {
        // /31 and /32 have no network or broadcast address (RFC 3021).
        IpNetwork::V4(_) if host_bits <= 1 => (network, last),
        IpNetwork::V4(_) => (network + 1, last - 1),
        IpNetwork::V6(_) if host_bits <= 8 => (network + 1, last),
        IpNetwork::V6(_) => (network + 1, last - IPV6_RESERVED_TOP),
    }
}

/// Ascending, contiguous runs of `ips` (given from the top down) as pool entries.
fn ranges(ips: &[IpAddr]) -> Vec<AddressEntry> {
    let mut sorted: Vec<IpAddr> = ips.to_vec();
    sorted.sort();
    let mut out = Vec::new();
    let mut run: Option<(IpAddr, IpAddr)> = None;
    for ip in sorted {
        run = match run {
            Some((a, b)) if to_u128(b) + 1 == to_u128(ip) => Some((a, ip)),
            Some((a, b)) => {
                out.push(entry(a, b));
                Some((ip, ip))
            }
            None => Some((ip, ip)),
        };
    }
    if let Some((a, b)) = run {
        out.push(entry(a, b));
    }
    out
}

fn entry(a: IpAddr, b: IpAddr) -> AddressEntry {
    if a == b {
        AddressEntry(a.to_string())
    } else {
        AddressEntry(format!("{a}-{b}"))
    }
}

#[cfg(test)]
mod tests;
