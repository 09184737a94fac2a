//! Which links exist on this node, and which of them announce a given IP.
//!
//! Two halves, kept apart so the rule can be tested without a kernel:
//!
//! * [`select`] (pure): given the links and an IP, the links whose MAC answers ARP/NDP
//!   for it.
//! * [`snapshot`] / [`watch`] (rtnetlink): read the links and their addresses from the
//!   kernel, and keep them current from the kernel's link and address notifications, so
//!   an interface that appears, vanishes, loses its carrier or gains an address is
//!   noticed at once, without polling and without a restart.
//!
//! # The interface rule (documented for users)
//!
//! An IP is announced on:
//!
//! 1. the L2Advertisement's `interfaces`, when that list is not empty. A listed interface
//!    that is a bridge, bond or team port announces on its master (the port itself never
//!    answers: frames reach the host through the master). A listed interface that is
//!    missing, down (admin down or no carrier), NOARP, loopback or has no Ethernet address
//!    is reported as a problem and skipped; the others still announce. For a port, the
//!    master's state is what counts (a bond stays usable while one member has carrier).
//! 2. otherwise, every link with an on-link subnet containing the IP (IPv4 or IPv6, same
//!    family as the IP; host routes `/32` and `/128` and IPv6 link-local `fe80::/10`
//!    addresses do not count as subnets, nor do loopback links). Ports again resolve to
//!    their master. If such links exist but none can announce (down, NOARP, …), the IP is
//!    announced nowhere: the segment it belongs to is unreachable, so announcing it on
//!    an unrelated link would only attract traffic this node cannot serve. This is what
//!    makes a node give up its IPs the moment its link goes down.
//! 3. otherwise (no link has a subnet containing the IP), the link(s) of the node's route
//!    to the IP: the longest prefix of the main routing table that holds it (usually the
//!    default route), out of the link(s) it names (ports resolve to their master; ECMP
//!    routes name several). If no route holds the IP, or its links cannot announce, the
//!    IP is announced nowhere and a problem says so.
//!
//! Never "every link": a node's Pod veths, CNI bridges and tunnels are links too, and a
//! Pod (or anything behind them) asking for a VIP must not be told the node's MAC, nor
//! may the node claim a VIP on a segment that is not its node network. Name the
//! interfaces in the L2Advertisement to announce elsewhere.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context as _;
use futures::{StreamExt, TryStreamExt};
use ipnetwork::IpNetwork;
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{
    InfoKind, InfoPortKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use tokio::sync::watch;

/// One network link as the announcer needs to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Kernel interface index (stable while the link exists; names can be reused).
    pub index: u32,
    pub name: String,
    /// The link's Ethernet address; `None` for links that are not Ethernet (loopback,
    /// tunnels, …), which cannot answer ARP/NDP.
    pub mac: Option<[u8; 6]>,
    /// Administratively up *and* carrier present (`IFF_UP && IFF_LOWER_UP`): a link that
    /// is up but has lost its carrier cannot deliver replies.
    pub up: bool,
    /// `IFF_NOARP`: the link does not do neighbour resolution (tunnels, `arp off`).
    pub noarp: bool,
    pub loopback: bool,
    /// Index of the bridge, bond or team this link is a port of. Other kinds of master
    /// (VRF, Open vSwitch datapath) are not reported: their ports still answer for
    /// themselves.
    pub master: Option<u32>,
    /// Addresses with their prefix length, both families, link-local included.
    pub addresses: Vec<IpNetwork>,
    /// Destinations of the main routing table's unicast routes out of this link (the
    /// default route is `0.0.0.0/0` or `::/0`), for the route rule of [`select`].
    pub routes: Vec<IpNetwork>,
}

/// The outcome of [`select`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Interface indexes to announce on, ascending, no duplicates.
    pub links: Vec<u32>,
    /// One line per explicitly wanted interface that cannot announce, naming it; the
    /// caller prefixes the L2Advertisement's name.
    pub problems: Vec<String>,
}

/// Bridges may nest (a bond in a bridge); a cycle in input data must not hang us.
const MAX_MASTER_DEPTH: usize = 8;

/// The links that announce `ip`, by the rule in the module documentation. `wanted` is
/// the L2Advertisement's `interfaces` (empty = the default rule).
pub fn select(links: &[Link], ip: IpAddr, wanted: &[String]) -> Selection {
    let mut selection = Selection::default();
    if wanted.is_empty() {
        let on_subnet: Vec<&Link> = links
            .iter()
            .filter(|l| !l.loopback && l.addresses.iter().any(|n| on_link_subnet(n, ip)))
            .collect();
        if on_subnet.is_empty() {
            let routed = routed_links(links, ip);
            if routed.is_empty() {
                selection.problems.push(format!(
                    "no interface has a subnet or a route holding {ip}, so it is announced nowhere; name the interfaces in the L2Advertisement's interfaces"
                ));
            }
            selection.links.extend(
                routed
                    .into_iter()
                    .filter_map(|l| announcer(links, l).ok())
                    .filter(|l| unusable(l).is_none())
                    .map(|l| l.index),
            );
        } else {
            selection.links.extend(
                on_subnet
                    .into_iter()
                    .filter_map(|l| announcer(links, l).ok())
                    .filter(|l| unusable(l).is_none())
                    .map(|l| l.index),
            );
        }
    } else {
        for name in wanted {
            let Some(link) = links.iter().find(|l| &l.name == name) else {
                selection
                    .problems
                    .push(format!("interface {name:?} not found"));
                continue;
            };
            let target = match announcer(links, link) {
                Ok(target) => target,
                Err(problem) => {
                    selection.problems.push(problem);
                    continue;
                }
            };
            match unusable(target) {
                None => selection.links.push(target.index),
                Some(why) if target.index == link.index => {
                    selection.problems.push(format!("interface {name:?} {why}"));
                }
                Some(why) => selection.problems.push(format!(
                    "interface {name:?} announces on its master {:?}, which {why}",
                    target.name
                )),
            }
        }
    }
    selection.links.sort_unstable();
    selection.links.dedup();
    selection
}

/// The links of the longest-prefix route holding `ip` (several for an ECMP route).
fn routed_links(links: &[Link], ip: IpAddr) -> Vec<&Link> {
    let best = links
        .iter()
        .filter(|l| !l.loopback)
        .flat_map(|l| l.routes.iter())
        .filter(|r| r.is_ipv4() == ip.is_ipv4() && r.contains(ip))
        .map(IpNetwork::prefix)
        .max();
    let Some(best) = best else { return Vec::new() };
    links
        .iter()
        .filter(|l| !l.loopback)
        .filter(|l| {
            l.routes
                .iter()
                .any(|r| r.prefix() == best && r.is_ipv4() == ip.is_ipv4() && r.contains(ip))
        })
        .collect()
}

/// The subnets this node can announce on: the on-link subnets of links that can answer
/// (themselves or through their master). Gossiped to peers, so that election passes
/// over a node cut off from an IP's segment.
pub fn reachable_subnets(links: &[Link]) -> Vec<IpNetwork> {
    let mut subnets: Vec<IpNetwork> = links
        .iter()
        .filter(|l| announcer(links, l).is_ok_and(|a| unusable(a).is_none()))
        .flat_map(|l| l.addresses.iter())
        .filter(|net| on_link_subnet(net, net.ip()))
        .filter_map(|net| IpNetwork::new(net.network(), net.prefix()).ok())
        .collect();
    subnets.sort();
    subnets.dedup();
    subnets
}

/// Whether `net` is an on-link subnet of the link that contains `ip`. Host routes and
/// IPv6 link-local prefixes say nothing about which segment `ip` lives on (kube-proxy
/// in IPVS mode, for one, puts every VIP as a /32 on a dummy link).
fn on_link_subnet(net: &IpNetwork, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpNetwork::V4(n), IpAddr::V4(_)) => n.prefix() < 32 && net.contains(ip),
        (IpNetwork::V6(n), IpAddr::V6(_)) => {
            n.prefix() < 128 && (n.ip().segments()[0] & 0xffc0) != 0xfe80 && net.contains(ip)
        }
        _ => false,
    }
}

/// The link that answers on behalf of `link`: itself, or its (outermost) master.
fn announcer<'a>(links: &'a [Link], link: &'a Link) -> Result<&'a Link, String> {
    let mut current = link;
    for _ in 0..MAX_MASTER_DEPTH {
        let Some(master) = current.master else {
            return Ok(current);
        };
        current = links.iter().find(|l| l.index == master).ok_or_else(|| {
            format!(
                "interface {:?} is a port of interface index {master}, which does not exist",
                link.name
            )
        })?;
    }
    Err(format!(
        "interface {:?} has masters nested deeper than {MAX_MASTER_DEPTH}",
        link.name
    ))
}

/// Why `link` cannot answer ARP/NDP itself, if it cannot.
fn unusable(link: &Link) -> Option<&'static str> {
    if link.loopback {
        Some("is a loopback interface")
    } else if !link.up {
        Some("is down (administratively or no carrier)")
    } else if link.noarp {
        Some("has ARP disabled (NOARP)")
    } else if link.mac.is_none() {
        Some("has no Ethernet address")
    } else {
        None
    }
}

/// One rtnetlink dump of links and addresses (of the namespace the connection behind
/// `handle` was opened in).
pub async fn snapshot(handle: &rtnetlink::Handle) -> anyhow::Result<Vec<Link>> {
    let messages: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .context("dumping links over rtnetlink")?;
    let addresses: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .context("dumping addresses over rtnetlink")?;
    let mut routes: Vec<RouteMessage> = Vec::new();
    for dump in [
        rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let mut part: Vec<RouteMessage> = handle
            .route()
            .get(dump)
            .execute()
            .try_collect()
            .await
            .context("dumping routes over rtnetlink")?;
        routes.append(&mut part);
    }

    let parsed: Vec<ParsedLink> = messages.into_iter().map(parse_link).collect();
    let kinds: HashMap<u32, Option<InfoKind>> = parsed
        .iter()
        .map(|p| (p.link.index, p.kind.clone()))
        .collect();
    let mut links: Vec<Link> = parsed
        .into_iter()
        .map(|p| {
            let mut link = p.link;
            link.master = p
                .controller
                .filter(|m| l2_master(p.port_kind.as_ref(), kinds.get(m).and_then(Option::as_ref)));
            link
        })
        .collect();
    for message in &addresses {
        if let Some((index, net)) = parse_address(message)
            && let Some(link) = links.iter_mut().find(|l| l.index == index)
        {
            link.addresses.push(net);
        }
    }
    for message in &routes {
        if let Some((destination, indexes)) = parse_route(message) {
            for index in indexes {
                if let Some(link) = links.iter_mut().find(|l| l.index == index)
                    && !link.routes.contains(&destination)
                {
                    link.routes.push(destination);
                }
            }
        }
    }
    links.sort_by_key(|l| l.index);
    Ok(links)
}

/// A link message decoded, before its master is known to be a bridge/bond/team.
struct ParsedLink {
    link: Link,
    kind: Option<InfoKind>,
    port_kind: Option<InfoPortKind>,
    controller: Option<u32>,
}

fn parse_link(message: LinkMessage) -> ParsedLink {
    let flags = message.header.flags;
    let ethernet = message.header.link_layer_type == LinkLayerType::Ether;
    let mut parsed = ParsedLink {
        link: Link {
            index: message.header.index,
            name: String::new(),
            mac: None,
            up: flags.contains(LinkFlags::Up) && flags.contains(LinkFlags::LowerUp),
            noarp: flags.contains(LinkFlags::Noarp),
            loopback: flags.contains(LinkFlags::Loopback),
            master: None,
            addresses: Vec::new(),
            routes: Vec::new(),
        },
        kind: None,
        port_kind: None,
        controller: None,
    };
    for attribute in message.attributes {
        match attribute {
            LinkAttribute::IfName(name) => parsed.link.name = name,
            LinkAttribute::Address(bytes) if ethernet => {
                parsed.link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok();
            }
            LinkAttribute::Controller(index) if index != 0 => parsed.controller = Some(index),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => parsed.kind = Some(kind),
                        LinkInfo::PortKind(kind) => parsed.port_kind = Some(kind),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    parsed
}

/// Whether a master makes its port a pure layer-2 member (answers belong on the
/// master). The port's own view (IFLA_INFO_SLAVE_KIND) wins; the master's kind covers
/// kernels or drivers that omit it.
fn l2_master(port_kind: Option<&InfoPortKind>, master_kind: Option<&InfoKind>) -> bool {
    match port_kind {
        Some(InfoPortKind::Bridge | InfoPortKind::Bond | InfoPortKind::Team) => true,
        Some(_) => false,
        None => matches!(
            master_kind,
            Some(InfoKind::Bridge | InfoKind::Bond | InfoKind::Team)
        ),
    }
}

/// The interface index and network of an address message. For IPv4 `IFA_LOCAL` is the
/// interface's own address (`IFA_ADDRESS` is the peer on point-to-point links).
fn parse_address(message: &AddressMessage) -> Option<(u32, IpNetwork)> {
    let mut local = None;
    let mut address = None;
    for attribute in &message.attributes {
        match attribute {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    let ip = local.or(address)?;
    let net = IpNetwork::new(ip, message.header.prefix_len).ok()?;
    Some((message.header.index, net))
}

/// A unicast route of the main table: its destination and the links it leaves by.
fn parse_route(message: &RouteMessage) -> Option<(IpNetwork, Vec<u32>)> {
    let header = &message.header;
    let mut table = u32::from(header.table);
    let mut destination = None;
    let mut indexes = Vec::new();
    for attribute in &message.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
                destination = Some(IpAddr::V4(*ip));
            }
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
                destination = Some(IpAddr::V6(*ip));
            }
            RouteAttribute::Oif(index) => indexes.push(*index),
            RouteAttribute::MultiPath(hops) => {
                indexes.extend(hops.iter().map(|h| h.interface_index));
            }
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || header.kind != RouteType::Unicast {
        return None;
    }
    let destination = destination.unwrap_or(match header.address_family {
        AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return None,
    });
    let net = IpNetwork::new(destination, header.destination_prefix_length).ok()?;
    Some((net, indexes))
}

/// A dump that does not finish in this time is retried (the kernel never takes this
/// long; it guards against a wedged socket).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between failed dumps, so a persistent error does not spin.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Keeps an up-to-date view of the links: subscribes to the kernel's link and address
/// notifications (RTNLGRP_LINK, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR and the route
/// groups RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE) and re-reads a
/// [`snapshot`] after each burst of them, publishing it when it differs from the last.
///
/// Events are only a trigger, never applied incrementally: a full dump cannot drift, and
/// a notification overrun (socket buffer full) is just one more trigger. Subscribing
/// before the first dump means no change between the two is missed.
///
/// Runs in the network namespace of the calling thread. The background task ends when
/// every receiver is dropped; if the kernel connection fails for good, the sender is
/// dropped and `changed()` on the receivers returns an error, which callers should treat
/// as fatal (they can no longer see links go down).
pub async fn watch() -> anyhow::Result<watch::Receiver<Vec<Link>>> {
    use rtnetlink::MulticastGroup;
    let (events_connection, events_handle, events) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])
    .context("subscribing to rtnetlink link and address notifications")?;
    tokio::spawn(events_connection);
    // Dumps use a socket of their own, so their replies never share a receive buffer
    // with a flood of notifications.
    let (dump_connection, handle, _) =
        rtnetlink::new_connection().context("opening an rtnetlink socket")?;
    tokio::spawn(dump_connection);

    let initial = snapshot(&handle).await?;
    let (tx, rx) = watch::channel(initial);
    tokio::spawn(async move {
        follow(&handle, events, &tx).await;
        // Closing the events channel before the handles lets both connection tasks see
        // that nobody listens any more and end.
        drop(events_handle);
        drop(handle);
    });
    Ok(rx)
}

type Events = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

async fn follow(handle: &rtnetlink::Handle, mut events: Events, tx: &watch::Sender<Vec<Link>>) {
    loop {
        tokio::select! {
            () = tx.closed() => return,
            event = events.next() => if event.is_none() {
                tracing::error!("rtnetlink notification stream ended; links are no longer followed");
                return;
            },
        }
        // Everything already queued belongs to the same burst: one dump covers it.
        while let Ok(_event) = events.try_recv() {}
        let links = loop {
            match tokio::time::timeout(SNAPSHOT_TIMEOUT, snapshot(handle)).await {
                Ok(Ok(links)) => break links,
                Ok(Err(error)) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "re-reading links failed; retrying"
                    );
                }
                Err(_) => tracing::warn!("re-reading links timed out; retrying"),
            }
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(RETRY_PAUSE) => {}
            }
        };
        tx.send_if_modified(|current| {
            let changed = *current != links;
            if changed {
                *current = links;
            }
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// An up, ARP-capable Ethernet link with the given addresses.
    fn link(index: u32, name: &str, addresses: &[&str]) -> Link {
        Link {
            index,
            name: name.to_string(),
            mac: Some([2, 0, 0, 0, 0, index as u8]),
            up: true,
            noarp: false,
            loopback: false,
            master: None,
            addresses: addresses.iter().map(|a| net(a)).collect(),
            routes: Vec::new(),
        }
    }

    /// `link` with routes out of it.
    fn routed(link: Link, routes: &[&str]) -> Link {
        Link {
            routes: routes.iter().map(|r| net(r)).collect(),
            ..link
        }
    }

    fn lo() -> Link {
        Link {
            mac: None,
            loopback: true,
            ..link(1, "lo", &["127.0.0.1/8", "::1/128"])
        }
    }

    #[test]
    fn reachable_subnets_are_those_of_links_that_can_answer() {
        let down = Link {
            up: false,
            ..link(3, "eth1", &["198.51.100.5/24"])
        };
        let port = Link {
            master: Some(5),
            ..link(4, "port0", &["203.0.113.9/24"])
        };
        let bridge = link(5, "br0", &[]);
        let links = vec![
            lo(),
            link(
                2,
                "eth0",
                &[
                    "192.0.2.10/24",
                    "2001:db8::10/64",
                    "fe80::1/64",
                    "192.0.2.99/32",
                ],
            ),
            down,
            port,
            bridge,
        ];
        let got: Vec<String> = reachable_subnets(&links)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(got, ["192.0.2.0/24", "203.0.113.0/24", "2001:db8::/64"]);
    }

    fn wanted(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn chosen(links: &[Link], ip: IpAddr, want: &[&str]) -> Vec<u32> {
        let selection = select(links, ip, &wanted(want));
        assert!(selection.problems.is_empty(), "{:?}", selection.problems);
        selection.links
    }

    #[test]
    fn default_rule_picks_the_link_whose_subnet_holds_the_ip() {
        let links = [
            lo(),
            link(2, "eth0", &["10.0.0.5/24"]),
            link(3, "eth1", &["192.0.2.10/24"]),
        ];
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [3]);
        assert_eq!(chosen(&links, ip("10.0.0.99"), &[]), [2]);
    }

    #[test]
    fn default_rule_picks_every_link_whose_subnet_holds_the_ip() {
        let links = [
            link(2, "eth0", &["192.0.2.10/24"]),
            link(3, "eth1", &["192.0.2.0/25"]),
            link(4, "eth2", &["10.0.0.5/24"]),
        ];
        assert_eq!(chosen(&links, ip("192.0.2.20"), &[]), [2, 3]);
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [2]);
    }

    #[test]
    fn default_rule_without_a_matching_subnet_uses_the_route_to_the_ip() {
        // A node: eth0 carries the default route, a Pod veth and a CNI bridge carry the
        // Pod network. A VIP off every subnet goes where the node routes it, never to
        // the Pods.
        let links = [
            lo(),
            routed(
                link(2, "eth0", &["10.0.0.5/24"]),
                &["0.0.0.0/0", "10.0.0.0/24", "::/0"],
            ),
            routed(link(3, "cni0", &["10.244.0.1/24"]), &["10.244.0.0/24"]),
            Link {
                master: Some(3),
                ..link(4, "veth1", &[])
            },
            routed(link(5, "cali1", &[]), &["10.245.0.7/32"]),
            routed(link(6, "eth1", &["172.16.0.5/24"]), &["198.51.100.0/24"]),
        ];
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [2]);
        assert_eq!(chosen(&links, ip("2001:db8::200"), &[]), [2]);
        // The longest prefix wins.
        assert_eq!(chosen(&links, ip("198.51.100.9"), &[]), [6]);
        // No route at all: nowhere, and said so.
        let unrouted: Vec<Link> = links
            .iter()
            .cloned()
            .map(|l| Link {
                routes: vec![],
                ..l
            })
            .collect();
        let selection = select(&unrouted, ip("192.0.2.200"), &[]);
        assert!(selection.links.is_empty());
        assert!(
            selection.problems[0]
                .contains("no interface has a subnet or a route holding 192.0.2.200"),
            "{:?}",
            selection.problems
        );
    }

    #[test]
    fn a_route_through_a_port_or_a_link_that_cannot_announce() {
        let links = [
            lo(),
            routed(link(2, "eth0", &["10.0.0.5/24"]), &["0.0.0.0/0"]),
            Link {
                up: false,
                ..link(3, "down0", &[])
            },
            Link {
                noarp: true,
                ..routed(link(4, "wg0", &["10.9.0.1/24"]), &["198.51.100.0/24"])
            },
            link(5, "eth1", &[]),
            Link {
                mac: None,
                ..link(6, "tun0", &[])
            },
        ];
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [2]);
        // Routed into a NOARP tunnel: not announced on eth0 instead.
        assert_eq!(
            select(&links, ip("198.51.100.1"), &[]).links,
            Vec::<u32>::new()
        );
    }

    #[test]
    fn default_rule_with_an_ecmp_route_uses_each_of_its_links() {
        let links = [
            lo(),
            routed(link(2, "eth0", &["10.0.0.5/24"]), &["0.0.0.0/0"]),
            routed(link(3, "eth1", &["10.0.1.5/24"]), &["0.0.0.0/0"]),
            routed(link(4, "eth2", &["10.0.2.5/24"]), &["10.0.0.0/8"]),
        ];
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [2, 3]);
    }

    #[test]
    fn a_matching_link_that_cannot_announce_is_not_replaced_by_others() {
        // The VIP's segment is behind eth1; announcing it on eth0 would attract traffic
        // this node cannot deliver. This is how a node gives its IPs up when its link dies.
        let base = [
            link(2, "eth0", &["10.0.0.5/24"]),
            link(3, "eth1", &["192.0.2.10/24"]),
        ];
        for broken in [
            Link {
                up: false,
                ..base[1].clone()
            },
            Link {
                noarp: true,
                ..base[1].clone()
            },
            Link {
                mac: None,
                ..base[1].clone()
            },
        ] {
            let links = [base[0].clone(), broken];
            assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), Vec::<u32>::new());
        }
    }

    #[test]
    fn host_routes_and_loopback_do_not_count_as_subnets() {
        // kube-proxy (IPVS) puts VIPs as /32 on a down dummy; an operator may put one
        // on lo. Neither says where the VIP's segment is.
        let links = [
            Link {
                addresses: vec![net("127.0.0.1/8"), net("192.0.2.200/32")],
                ..lo()
            },
            Link {
                up: false,
                noarp: true,
                ..link(2, "kube-ipvs0", &["192.0.2.200/32", "2001:db8::200/128"])
            },
            routed(link(3, "eth0", &["10.0.0.5/24"]), &["0.0.0.0/0", "::/0"]),
        ];
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [3]);
        assert_eq!(chosen(&links, ip("2001:db8::200"), &[]), [3]);
    }

    #[test]
    fn down_noarp_and_loopback_links_are_never_chosen() {
        let links = [
            lo(),
            Link {
                up: false,
                ..link(2, "down0", &["192.0.2.10/24"])
            },
            Link {
                noarp: true,
                ..link(3, "noarp0", &["192.0.2.11/24"])
            },
            routed(
                link(4, "eth0", &["192.0.2.12/24"]),
                &["192.0.2.0/24", "0.0.0.0/0"],
            ),
        ];
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [4]);
        assert_eq!(chosen(&links, ip("198.51.100.1"), &[]), [4]);
    }

    #[test]
    fn bridge_port_announces_on_its_bridge() {
        let links = [
            Link {
                master: Some(3),
                ..link(2, "eth0", &[])
            },
            link(3, "br0", &["192.0.2.1/24"]),
            Link {
                master: Some(3),
                ..link(4, "veth1", &[])
            },
        ];
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [3]);
        // A route out of a port: the bridge stands for it.
        let links = [
            routed(links[0].clone(), &["0.0.0.0/0"]),
            links[1].clone(),
            links[2].clone(),
        ];
        assert_eq!(chosen(&links, ip("198.51.100.1"), &[]), [3]);
        assert_eq!(chosen(&links, ip("192.0.2.200"), &["eth0"]), [3]);
    }

    #[test]
    fn a_port_holding_the_subnet_resolves_to_its_master() {
        let links = [
            Link {
                master: Some(3),
                ..link(2, "eth0", &["192.0.2.10/24"])
            },
            link(3, "bond0", &[]),
            link(4, "eth9", &["10.0.0.1/24"]),
        ];
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [3]);
    }

    #[test]
    fn bond_members_announce_once_on_the_bond() {
        let links = [
            Link {
                master: Some(4),
                ..link(2, "eth0", &[])
            },
            Link {
                master: Some(4),
                up: false,
                ..link(3, "eth1", &[])
            },
            link(4, "bond0", &["192.0.2.10/24", "2001:db8::10/64"]),
        ];
        // Both members share a master: one entry, not two; a member's own carrier loss
        // does not matter while the bond is up.
        assert_eq!(chosen(&links, ip("192.0.2.200"), &["eth0", "eth1"]), [4]);
        assert_eq!(chosen(&links, ip("2001:db8::200"), &[]), [4]);
        assert_eq!(chosen(&links, ip("192.0.2.200"), &["eth0", "bond0"]), [4]);
    }

    #[test]
    fn nested_masters_resolve_to_the_outermost() {
        let links = [
            Link {
                master: Some(3),
                ..link(2, "eth0", &[])
            },
            Link {
                master: Some(4),
                ..link(3, "bond0", &[])
            },
            link(4, "br0", &["192.0.2.1/24"]),
        ];
        assert_eq!(chosen(&links, ip("192.0.2.200"), &["eth0"]), [4]);
    }

    #[test]
    fn a_master_cycle_is_a_problem_not_a_hang() {
        let links = [
            Link {
                master: Some(3),
                ..link(2, "a", &[])
            },
            Link {
                master: Some(2),
                ..link(3, "b", &[])
            },
        ];
        let selection = select(&links, ip("192.0.2.1"), &wanted(&["a"]));
        assert!(selection.links.is_empty());
        assert_eq!(selection.problems.len(), 1);
        assert!(
            selection.problems[0].contains("\"a\""),
            "{:?}",
            selection.problems
        );
        // And the default rule simply skips the ports.
        assert!(select(&links, ip("192.0.2.1"), &[]).links.is_empty());
    }

    #[test]
    fn explicit_list_overrides_subnets_and_reports_unusable_names() {
        let links = [
            lo(),
            link(2, "eth0", &["192.0.2.10/24"]),
            link(3, "eth1", &["10.0.0.5/24"]),
            Link {
                up: false,
                ..link(4, "down0", &[])
            },
            Link {
                noarp: true,
                ..link(5, "noarp0", &[])
            },
            Link {
                mac: None,
                ..link(6, "tun0", &[])
            },
            Link {
                master: Some(8),
                ..link(7, "port0", &[])
            },
            Link {
                up: false,
                ..link(8, "br0", &[])
            },
        ];
        // The subnet is on eth0, but the user asked for eth1: eth1 it is.
        assert_eq!(chosen(&links, ip("192.0.2.200"), &["eth1"]), [3]);

        let selection = select(
            &links,
            ip("192.0.2.200"),
            &wanted(&["eth1", "ghost", "down0", "noarp0", "lo", "tun0", "port0"]),
        );
        assert_eq!(selection.links, [3]);
        let problems = selection.problems;
        assert_eq!(problems.len(), 6, "{problems:?}");
        assert!(problems[0].contains("\"ghost\"") && problems[0].contains("not found"));
        assert!(problems[1].contains("\"down0\"") && problems[1].contains("down"));
        assert!(problems[2].contains("\"noarp0\"") && problems[2].contains("NOARP"));
        assert!(problems[3].contains("\"lo\"") && problems[3].contains("loopback"));
        assert!(problems[4].contains("\"tun0\"") && problems[4].contains("Ethernet"));
        assert!(
            problems[5].contains("\"port0\"")
                && problems[5].contains("\"br0\"")
                && problems[5].contains("down"),
            "{problems:?}"
        );
    }

    #[test]
    fn a_port_whose_master_is_missing_is_a_problem() {
        let links = [Link {
            master: Some(9),
            ..link(2, "eth0", &[])
        }];
        let selection = select(&links, ip("192.0.2.1"), &wanted(&["eth0"]));
        assert!(selection.links.is_empty());
        assert!(
            selection.problems[0].contains("\"eth0\""),
            "{:?}",
            selection.problems
        );
    }

    #[test]
    fn ipv6_subnets_match_like_ipv4_ones() {
        let links = [
            lo(),
            link(2, "eth0", &["192.0.2.10/24", "fe80::1/64"]),
            link(3, "eth1", &["2001:db8::10/64", "fe80::2/64"]),
        ];
        assert_eq!(chosen(&links, ip("2001:db8::200"), &[]), [3]);
        // An IPv4 subnet never matches an IPv6 IP, nor the other way round.
        assert_eq!(chosen(&links, ip("192.0.2.200"), &[]), [2]);
    }

    #[test]
    fn ipv6_with_only_link_local_addresses_uses_the_route() {
        let links = [
            lo(),
            routed(link(2, "eth0", &["192.0.2.10/24", "fe80::1/64"]), &["::/0"]),
            link(3, "eth1", &["fe80::2/64"]),
            Link {
                up: false,
                ..link(4, "eth2", &["fe80::3/64"])
            },
        ];
        assert_eq!(chosen(&links, ip("2001:db8::200"), &[]), [2]);
        // Even an IP inside fe80::/10 is not matched by the link-local prefixes.
        assert_eq!(chosen(&links, ip("fe80::99"), &[]), [2]);
    }

    #[test]
    fn no_links_no_selection() {
        assert!(select(&[], ip("192.0.2.1"), &[]).links.is_empty());
    }

    #[test]
    fn l2_masters_are_bridge_bond_and_team_only() {
        assert!(l2_master(Some(&InfoPortKind::Bridge), None));
        assert!(l2_master(Some(&InfoPortKind::Bond), None));
        assert!(l2_master(Some(&InfoPortKind::Team), None));
        assert!(!l2_master(Some(&InfoPortKind::Vrf), Some(&InfoKind::Vrf)));
        assert!(!l2_master(
            Some(&InfoPortKind::Other("openvswitch".into())),
            None
        ));
        assert!(l2_master(None, Some(&InfoKind::Bridge)));
        assert!(!l2_master(None, Some(&InfoKind::Vrf)));
        assert!(!l2_master(None, None));
    }

    fn arb_link() -> impl Strategy<Value = Link> {
        let addr = prop_oneof![
            (any::<[u8; 4]>(), 0u8..=32)
                .prop_map(|(o, p)| IpNetwork::new(IpAddr::from(o), p).unwrap()),
            (any::<[u8; 16]>(), 0u8..=128)
                .prop_map(|(o, p)| IpNetwork::new(IpAddr::from(o), p).unwrap()),
        ];
        (
            1u32..8,
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(1u32..8),
            proptest::collection::vec(addr, 0..3),
        )
            .prop_map(
                |(index, mac, up, noarp, loopback, master, addresses)| Link {
                    index,
                    name: format!("if{index}"),
                    mac: mac.then_some([2, 0, 0, 0, 0, index as u8]),
                    up,
                    noarp,
                    loopback,
                    master,
                    addresses,
                    routes: vec![],
                },
            )
    }

    proptest! {
        /// Whatever the links, only usable, unenslaved links are chosen, each once.
        #[test]
        fn only_usable_links_are_chosen(
            links in proptest::collection::vec(arb_link(), 0..6),
            octets in any::<[u8; 4]>(),
            want in proptest::collection::vec(1u32..10, 0..3),
        ) {
            let want: Vec<String> = want.iter().map(|i| format!("if{i}")).collect();
            let selection = select(&links, IpAddr::from(octets), &want);
            prop_assert!(selection.links.windows(2).all(|w| w[0] < w[1]));
            for index in &selection.links {
                let chosen = links.iter().find(|l| l.index == *index && l.master.is_none() && unusable(l).is_none());
                prop_assert!(chosen.is_some(), "{index} chosen from {links:?}");
            }
            // One problem per wanted name, or the one "no route" problem.
            prop_assert!(selection.problems.len() <= want.len().max(1));
        }
    }
}
