use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrolb_api::manifests::{Located, Manifests};

use super::*;
use crate::election::MemberView;

const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

/// Three Ready nodes on 10.99.0.0/24 and fd99::/64, a fromNodeNetwork pool of `size`
/// and an L2Advertisement for it; `extra` is appended.
fn objects(size: u32, extra: &str) -> Manifests {
    let mut m = Manifests::default();
    let mut text = String::new();
    for (name, last) in [("node1", 11), ("node2", 12), ("node3", 13)] {
        text.push_str(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nstatus:\n  addresses: [{{type: InternalIP, address: 10.99.0.{last}}}, {{type: InternalIP, address: 'fd99::{last:x}'}}]\n  conditions: [{{type: Ready, status: 'True'}}]\n---\n"
        ));
    }
    text.push_str(&format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: default}}\nspec: {{fromNodeNetwork: {{size: {size}}}}}\n---\napiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: default}}\nspec: {{}}\n{extra}"
    ));
    let errors = m.add_text("objects.yaml", &text);
    assert!(errors.is_empty(), "{errors:?}");
    m
}

fn link(addresses: &[&str]) -> Link {
    Link {
        index: 2,
        name: "eth0".into(),
        mac: Some(MAC),
        up: true,
        noarp: false,
        loopback: false,
        master: None,
        addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
        routes: Vec::new(),
    }
}

/// `m` with its pool resolved to `addresses`, as a speaker writes it.
fn resolved_to(mut m: Manifests, addresses: &[&str]) -> Manifests {
    let mut pool = (*m.pools[0].object).clone();
    pool.status = Some(ferrolb_api::IPAddressPoolStatus {
        node_network: Some(NodeNetworkStatus {
            addresses: addresses.iter().map(|a| (*a).into()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    });
    m.pools[0] = Located::new(m.pools[0].origin.clone(), pool);
    m
}

/// `m` with node `index`'s InternalIPv4 changed to `ip`.
fn node_moved(mut m: Manifests, index: usize, ip: &str) -> Manifests {
    let mut node = (*m.nodes[index].object).clone();
    node.status.as_mut().unwrap().addresses.as_mut().unwrap()[0].address = ip.into();
    m.nodes[index] = Located::new(m.nodes[index].origin.clone(), node);
    m
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn candidates_for(
    m: &Manifests,
    view: &ClusterView,
    links: &[Link],
    gateways: &[IpAddr],
) -> Result<Candidates, String> {
    let pools = to_resolve(m, "node1", view);
    assert_eq!(pools.len(), 1, "node1 resolves the pool");
    let nodes: Vec<&Node> = m.nodes.iter().map(|n| &*n.object).collect();
    candidates(
        &pools[0],
        &Network {
            me: "node1",
            links,
            nodes: &nodes,
            view,
            gateways,
        },
    )
}

#[test]
fn the_first_live_eligible_node_resolves_and_only_while_unresolved() {
    let m = objects(4, "");
    let everyone = ClusterView::everyone();
    assert_eq!(to_resolve(&m, "node1", &everyone)[0].pool, "default");
    assert!(to_resolve(&m, "node2", &everyone).is_empty());
    // node1 is dead: node2 takes over.
    let alive = ClusterView {
        members: Some(
            ["node2", "node3"]
                .into_iter()
                .map(|n| (n.to_string(), MemberView::default()))
                .collect(),
        ),
    };
    assert!(to_resolve(&m, "node1", &alive).is_empty());
    assert_eq!(to_resolve(&m, "node2", &alive).len(), 1);
    // Resolved: nobody touches it again.
    let resolved = resolved_to(objects(4, ""), &["10.99.0.251-10.99.0.254"]);
    assert!(to_resolve(&resolved, "node1", &everyone).is_empty());
    // No advertisement announces it: which nodes must agree is unknown.
    let mut lonely = objects(4, "");
    lonely.l2_advertisements.clear();
    assert!(to_resolve(&lonely, "node1", &everyone).is_empty());
}

#[test]
fn the_top_of_each_subnet_minus_nodes_gateways_and_reserved_addresses() {
    // node3 sits at the very top of the IPv4 subnet; the gateway just below it.
    let m = node_moved(objects(3, ""), 2, "10.99.0.254");
    let links = [link(&["10.99.0.11/24", "fd99::b/64", "fe80::1/64"])];
    let found = candidates_for(&m, &ClusterView::everyone(), &links, &[ip("10.99.0.253")]).unwrap();
    assert_eq!(
        found.subnets,
        vec![
            "10.99.0.0/24".parse::<IpNetwork>().unwrap(),
            "fd99::/64".parse().unwrap()
        ]
    );
    let v4 = &found.addresses[&Family::V4];
    assert_eq!(v4[0], ip("10.99.0.252"), "below the node and the gateway");
    assert_eq!(v4.len(), 3 + PROBE_MARGIN);
    assert!(!v4.contains(&ip("10.99.0.255")) && !v4.contains(&ip("10.99.0.11")));
    let v6 = &found.addresses[&Family::V6];
    assert_eq!(
        v6[0],
        ip("fd99::ffff:ffff:ffff:ff7f"),
        "below RFC 2526's anycast block"
    );
    assert_eq!(
        found.skipped,
        vec![
            (ip("10.99.0.254"), "InternalIP of node node3".to_string()),
            (ip("10.99.0.253"), "a default gateway".to_string()),
        ]
    );
    // Nobody answers: the highest three of each family, as ranges.
    let status = resolve(
        &to_resolve(&m, "node1", &ClusterView::everyone())[0],
        &found,
        &BTreeMap::new(),
        "node1",
    );
    assert_eq!(
        status.addresses,
        vec![
            AddressEntry::from("10.99.0.250-10.99.0.252"),
            AddressEntry::from("fd99::ffff:ffff:ffff:ff7d-fd99::ffff:ffff:ffff:ff7f"),
        ]
    );
    assert_eq!(status.subnets, vec!["10.99.0.0/24", "fd99::/64"]);
    assert_eq!(
        status.skipped,
        vec![
            "10.99.0.254: InternalIP of node node3",
            "10.99.0.253: a default gateway"
        ]
    );
    assert_eq!(status.resolved_by, "node1");
    assert_eq!(status.problem, None);
}

#[test]
fn an_address_answered_on_the_wire_is_skipped_and_named() {
    let m = objects(2, "");
    let links = [link(&["10.99.0.11/24"])];
    let mut pool = to_resolve(&m, "node1", &ClusterView::everyone()).remove(0);
    pool.spec.families = vec![Family::V4];
    let nodes: Vec<&Node> = m.nodes.iter().map(|n| &*n.object).collect();
    let view = ClusterView::everyone();
    let found = candidates(
        &pool,
        &Network {
            me: "node1",
            links: &links,
            nodes: &nodes,
            view: &view,
            gateways: &[],
        },
    )
    .unwrap();
    assert_eq!(found.addresses.len(), 1, "IPv4 only, as asked");
    let in_use = BTreeMap::from([(ip("10.99.0.254"), OTHER), (ip("10.99.0.252"), OTHER)]);
    let status = resolve(&pool, &found, &in_use, "node1");
    assert_eq!(
        status.addresses,
        vec![
            AddressEntry::from("10.99.0.251"),
            AddressEntry::from("10.99.0.253")
        ]
    );
    assert_eq!(
        status.skipped,
        vec![
            "10.99.0.254: answered on the wire by 02:00:00:00:00:99",
            "10.99.0.252: answered on the wire by 02:00:00:00:00:99",
        ]
    );
    // Everything answers: a problem, no addresses.
    let all: BTreeMap<IpAddr, [u8; 6]> = found.addresses[&Family::V4]
        .iter()
        .map(|ip| (*ip, OTHER))
        .collect();
    let status = resolve(&pool, &found, &all, "node1");
    assert!(status.addresses.is_empty());
    assert_eq!(
        status.problem.as_deref(),
        Some(
            "only 0 of the 18 IPv4 addresses probed are free, fewer than spec.fromNodeNetwork.size 2"
        )
    );
}

#[test]
fn nodes_on_different_subnets_are_named() {
    let m = node_moved(objects(4, ""), 2, "10.98.0.5");
    let links = [link(&["10.99.0.11/24"])];
    let err = candidates_for(&m, &ClusterView::everyone(), &links, &[]).unwrap_err();
    assert!(err.starts_with("the nodes do not share one IPv4 subnet: node1 is on 10.99.0.0/24 (10.99.0.11); node3's InternalIP 10.98.0.5 is outside it"), "{err}");

    // The same prefix seen through gossip: node2's links are on a /25 elsewhere.
    let m = objects(4, "");
    let member = |subnets: &[&str]| MemberView {
        subnets: subnets.iter().map(|s| s.parse().unwrap()).collect(),
        settled: true,
        known: true,
        proxy_failing: false,
    };
    let view = ClusterView {
        members: Some(BTreeMap::from([
            ("node1".to_string(), member(&["10.99.0.0/24"])),
            ("node2".to_string(), member(&["10.99.0.0/25"])),
            ("node3".to_string(), member(&["10.99.0.0/24"])),
        ])),
    };
    let links = [link(&["10.99.0.11/24"])];
    let mut pool = to_resolve(&m, "node1", &view).remove(0);
    pool.spec.families = vec![Family::V4];
    let nodes: Vec<&Node> = m.nodes.iter().map(|n| &*n.object).collect();
    let err = candidates(
        &pool,
        &Network {
            me: "node1",
            links: &links,
            nodes: &nodes,
            view: &view,
            gateways: &[],
        },
    )
    .unwrap_err();
    assert!(
        err.ends_with("node2's interfaces are on 10.99.0.0/25"),
        "{err}"
    );
}

#[test]
fn a_subnet_too_small_or_an_internal_ip_on_no_interface_is_a_problem() {
    let m = objects(8, "");
    let links = [link(&["10.99.0.11/29", "fd99::b/64"])];
    let err = candidates_for(&m, &ClusterView::everyone(), &links, &[]).unwrap_err();
    assert_eq!(
        err,
        "10.99.0.8/29 has 3 usable addresses that are no node's or gateway's, fewer than spec.fromNodeNetwork.size 8"
    );
    let links = [link(&["10.99.0.50/24"])];
    let err = candidates_for(&m, &ClusterView::everyone(), &links, &[]).unwrap_err();
    assert_eq!(
        err,
        "node1's InternalIP 10.99.0.11 is on none of its interfaces"
    );
}

#[test]
fn default_gateways_are_read_from_proc() {
    let route =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t010063 0A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
            .replace("010063 0A", "0100630A");
    let route = format!("{route}eth0\t0000630A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n");
    let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd990000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
        fd990000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
    assert_eq!(gateways(&route, v6), vec![ip("10.99.0.1"), ip("fd99::1")]);
    assert!(gateways("", "").is_empty());
}

#[test]
fn a_node_on_a_resolved_address_is_reported() {
    let m = resolved_to(objects(4, ""), &["10.99.0.10-10.99.0.12"]);
    let said = newly_taken(&m);
    assert_eq!(said.len(), 2, "{said:?}");
    assert!(said[0].contains("node node1 now has it"), "{said:?}");
}
