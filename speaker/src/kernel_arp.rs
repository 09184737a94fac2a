//! Whether this node's own kernel answers ARP for external IPs it does not announce:
//! kube-proxy in IPVS mode puts every LoadBalancer IP on its dummy link `kube-ipvs0`,
//! and with `arp_ignore` 0 (Linux's default) the kernel answers ARP for an address of
//! any of its links on every link. Every node then answers for every VIP, and clients
//! reach whichever answered last. kube-proxy's `ipvs.strictARP: true` sets
//! `arp_ignore=1` (answer only for the receiving link's addresses) and `arp_announce=2`,
//! which is what MetalLB, kube-vip and ferrolb all need. IPv6 does not have the problem:
//! Linux answers a Neighbor Solicitation only for the receiving link's addresses.
//!
//! Pure: the links and the `arp_ignore` values in, a finding out.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::interfaces::Link;

/// VIPs this node's kernel answers ARP for, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelAnswers {
    /// The VIPs it does not announce itself, held by local links.
    pub vips: Vec<IpAddr>,
    /// The links holding them (`kube-ipvs0`).
    pub holders: Vec<String>,
    /// The ARP-capable links whose effective `arp_ignore` is 0, where it answers.
    pub answering_on: Vec<String>,
}

impl std::fmt::Display for KernelAnswers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first: Vec<String> = self.vips.iter().take(5).map(ToString::to_string).collect();
        let more = self.vips.len().saturating_sub(first.len());
        write!(
            f,
            "this node's kernel answers ARP on {} for {} VIP(s) it does not announce ({}{}), \
             because {} hold(s) them and arp_ignore is 0: kube-proxy in IPVS mode without \
             strictARP; set ipvs.strictARP: true in kube-proxy's configuration (or \
             net.ipv4.conf.all.arp_ignore=1 and arp_announce=2)",
            self.answering_on.join(", "),
            self.vips.len(),
            first.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
            self.holders.join(", ")
        )
    }
}

/// The IPv4 `vips` that some local link holds though this node does not announce them
/// (`owned`), by link name; empty when none does (the usual case, decided without
/// reading any sysctl).
pub fn held_locally(
    links: &[Link],
    vips: &BTreeSet<IpAddr>,
    owned: &BTreeSet<IpAddr>,
) -> Vec<(IpAddr, String)> {
    let mut held: Vec<(IpAddr, String)> = links
        .iter()
        .flat_map(|l| l.addresses.iter().map(move |a| (a.ip(), l)))
        .filter(|(ip, _)| ip.is_ipv4() && vips.contains(ip) && !owned.contains(ip))
        .map(|(ip, l)| (ip, l.name.clone()))
        .collect();
    held.sort();
    held.dedup();
    held
}

/// Given what [`held_locally`] found and each link's effective `arp_ignore` (the
/// larger of `all`'s and the link's), whether the kernel answers for them.
pub fn kernel_answers(
    links: &[Link],
    held: &[(IpAddr, String)],
    arp_ignore: impl Fn(&str) -> u32,
) -> Option<KernelAnswers> {
    if held.is_empty() {
        return None;
    }
    // Links on an IPv4 subnet, where clients ask: not Pod veths and the like, which
    // would only lengthen the message (and the sysctls read).
    let answering_on: Vec<String> = links
        .iter()
        .filter(|l| !l.loopback && l.up && !l.noarp && l.mac.is_some())
        .filter(|l| {
            l.addresses
                .iter()
                .any(|a| matches!(a, ipnetwork::IpNetwork::V4(n) if n.prefix() < 32))
        })
        .filter(|l| !held.iter().any(|(_, holder)| *holder == l.name))
        .filter(|l| arp_ignore(&l.name) == 0)
        .map(|l| l.name.clone())
        .collect();
    if answering_on.is_empty() {
        return None;
    }
    let vips: BTreeSet<IpAddr> = held.iter().map(|(ip, _)| *ip).collect();
    let holders: BTreeSet<String> = held.iter().map(|(_, l)| l.clone()).collect();
    Some(KernelAnswers {
        vips: vips.into_iter().collect(),
        holders: holders.into_iter().collect(),
        answering_on,
    })
}

/// The effective `arp_ignore` of `link`, read from /proc/sys (the larger of `all` and
/// the link's own, as the kernel applies it); 0 when unreadable.
pub fn read_arp_ignore(link: &str) -> u32 {
    let read = |name: &str| {
        // A link name is at most 15 bytes with no '/', as the kernel allows.
        if name.contains('/') || name.contains("..") {
            return 0;
        }
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{name}/arp_ignore"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    read("all").max(read(link))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, addresses: &[&str], mac: bool) -> Link {
        Link {
            index: 1,
            name: name.into(),
            mac: mac.then_some([2, 0, 0, 0, 0, 1]),
            up: true,
            noarp: !mac,
            loopback: false,
            master: None,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            routes: vec![],
        }
    }

    #[test]
    fn ipvs_without_strict_arp_is_found_and_named() {
        let links = [
            link("eth0", &["192.0.2.11/24"], true),
            link("cali1234", &["fe80::1/64"], true),
            link(
                "kube-ipvs0",
                &["192.0.2.200/32", "192.0.2.201/32", "10.96.0.1/32"],
                false,
            ),
        ];
        let vips: BTreeSet<IpAddr> = ["192.0.2.200", "192.0.2.201"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let owned: BTreeSet<IpAddr> = ["192.0.2.201".parse().unwrap()].into();
        let held = held_locally(&links, &vips, &owned);
        assert_eq!(
            held,
            [("192.0.2.200".parse().unwrap(), "kube-ipvs0".into())]
        );
        let found = kernel_answers(&links, &held, |_| 0).expect("found");
        assert_eq!(found.answering_on, ["eth0"]);
        assert!(
            found.to_string().starts_with(
                "this node's kernel answers ARP on eth0 for 1 VIP(s) it does not announce (192.0.2.200), because kube-ipvs0 hold(s) them"
            ),
            "{found}"
        );
        // strictARP (arp_ignore=1): nothing to say.
        assert_eq!(kernel_answers(&links, &held, |_| 1), None);
        // No VIP on a local link: nothing to read, nothing to say.
        assert!(held_locally(&links[..1], &vips, &owned).is_empty());
    }
}
