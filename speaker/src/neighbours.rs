//! Which node a MAC belongs to, from the kernel's IPv4 neighbour table: membership
//! traffic keeps an entry for every peer's InternalIP on the segment, so a MAC that
//! answers for one of our IPs can be named by node (MetalLB's speaker on node-b, say)
//! rather than by MAC alone.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::Node;

use ferrolb_api::Family;

use crate::announcements::internal_ip;

/// The complete entries of `/proc/net/arp`: IP and MAC. Lines that do not parse, and
/// incomplete entries (flags without 0x2, an all-zero MAC), are skipped.
pub fn parse_proc_net_arp(text: &str) -> Vec<(Ipv4Addr, [u8; 6])> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let ip: Ipv4Addr = fields.next()?.parse().ok()?;
            let _hw_type = fields.next()?;
            let flags = u32::from_str_radix(fields.next()?.trim_start_matches("0x"), 16).ok()?;
            let mac = crate::mac::parse(fields.next()?)?;
            (flags & 0x2 != 0 && mac != [0; 6]).then_some((ip, mac))
        })
        .collect()
}

/// The node of each MAC in `table` that is a node's InternalIPv4: one pass over each,
/// however many IPs are then looked up.
pub fn nodes_by_mac<'a>(
    table: &[(Ipv4Addr, [u8; 6])],
    nodes: impl IntoIterator<Item = &'a Node>,
) -> HashMap<[u8; 6], String> {
    let by_ip: HashMap<Ipv4Addr, &str> = nodes
        .into_iter()
        .filter_map(|node| match internal_ip(node, Family::V4)? {
            IpAddr::V4(ip) => Some((ip, node.metadata.name.as_deref()?)),
            IpAddr::V6(_) => None,
        })
        .collect();
    table
        .iter()
        .filter_map(|(ip, mac)| Some((*mac, by_ip.get(ip)?.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str =
        "IP address       HW type     Flags       HW address            Mask     Device
10.99.0.12       0x1         0x2         6e:79:2e:3d:23:52     *        eth0
10.99.0.13       0x1         0x0         00:00:00:00:00:00     *        eth0
10.99.0.2        0x1         0x2         02:00:00:00:00:64     *        eth0
garbage
";

    fn node(name: &str, ip: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
        }))
        .unwrap()
    }

    #[test]
    fn a_mac_is_named_by_the_node_whose_internal_ip_has_it() {
        let table = parse_proc_net_arp(TABLE);
        assert_eq!(table.len(), 2, "incomplete entries and garbage are skipped");
        let nodes = [node("node2", "10.99.0.12"), node("node3", "10.99.0.13")];
        let by_mac = nodes_by_mac(&table, &nodes);
        let mac = [0x6e, 0x79, 0x2e, 0x3d, 0x23, 0x52];
        assert_eq!(by_mac.get(&mac).map(String::as_str), Some("node2"));
        // The client's MAC is in the table, but no node's.
        assert_eq!(by_mac.get(&[2, 0, 0, 0, 0, 0x64]), None);
    }
}
