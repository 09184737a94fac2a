//! `NodeAnnouncement`: what one node announces, written by that node's speaker, and the
//! `ferrolb.io/AnnouncedIPv4`/`IPv6` condition the controller writes on each Service from
//! these records.
//!
//! One object per node, named after the Node, in ferrolb's namespace: a speaker writes
//! only its own (RBAC cannot say "your own node"; the chart's ValidatingAdmissionPolicy
//! compares the object's name with the node its ServiceAccount token is bound to), so a
//! compromised node can neither rewrite any Service's status nor speak for another node.
//! A node writes its record only when what it announces changes: API load follows
//! ownership changes, never the number of Services or time.
//!
//! The condition's wording and how it is recognised live here, once: the controller
//! writes it ([`condition_text`]) and `ferrolb why` recognises it ([`reports`]).

use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::Family;

/// The most IPs one record lists (the CRD's `maxItems`).
pub const MAX_IPS: usize = 10_000;
/// The most Services one IP lists (IPs shared by more are listed with the first ones).
pub const MAX_SERVICES_PER_IP: usize = 64;
/// The most interfaces one IP lists.
pub const MAX_INTERFACES: usize = 8;
/// How large a record's `spec` may grow, serialized: the speaker lists no more IPs than
/// fit, so a record stays well under etcd's 1.5 MiB object limit (with metadata and
/// managed fields). With typical names (`shop/web-frontend-12`, one interface, IPv4) an
/// IP takes about 120 bytes: some 8,800 Services per node; with the longest names
/// Kubernetes allows (63-character namespace and name, IPv6, a 15-character interface)
/// about 260 bytes: some 4,000. See `the_size_budget_in_services`.
pub const MAX_SPEC_BYTES: usize = 1024 * 1024;

/// What one node announces. Named after the node; written only by that node's speaker.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrolb.io",
    version = "v1beta1",
    kind = "NodeAnnouncement",
    doc = "What one node announces (named after the Node). Written by that node's speaker only; the controller turns it into each Service's ferrolb.io/AnnouncedIPv4/IPv6 condition.",
    plural = "nodeannouncements",
    namespaced,
    category = "ferrolb",
    printcolumn(name = "IPs", type_ = "integer", json_path = ".spec.count"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeAnnouncementSpec {
    /// Each IP this node answers ARP and Neighbor Solicitations for, and each IP it
    /// announced last that no node may announce now (with no interfaces).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_IPS))]
    pub ips: Vec<AnnouncedIP>,
    /// How many IPs are listed (for `kubectl get`).
    #[serde(default)]
    pub count: i32,
    /// Why kube-proxy on this node fails its health check, while it does: the election
    /// passes the node over while another node can deliver. Absent when it passes or is
    /// not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub kube_proxy_failing: Option<String>,
    /// The node's own kernel answers ARP for VIPs this node does not announce
    /// (kube-proxy in IPVS mode without strictARP): what, and what to change. Absent
    /// when it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub kernel_answers_arp: Option<String>,
}

/// One IP as this node announces it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnnouncedIP {
    /// The IP, as in the Services' status.loadBalancer.ingress.
    #[schemars(schema_with = "ip_schema")]
    pub ip: String,
    /// The interfaces this node answers on; empty: it announced the IP last and no node
    /// may announce it now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_INTERFACES), schema_with = "interfaces_schema")]
    pub interfaces: Vec<String>,
    /// The Services holding the IP, as namespace/name.
    #[schemars(schema_with = "services_schema")]
    pub services: Vec<String>,
    /// Another host that answers for the IP on this node's segment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub other_responder: Option<OtherResponder>,
    /// When this node took the IP over (or gave it up): the newest claim on an IP is the
    /// one shown when two nodes claim it (a failover, or a split cluster).
    pub since: MicroTime,
}

fn ip_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "maxLength": 45})
}

fn node_name_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({"type": "string", "maxLength": 253})
}

/// Another host that answers for an IP a node was elected to announce.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OtherResponder {
    /// Its MAC, as it answered the node's probe.
    #[schemars(schema_with = "mac_schema")]
    pub mac: String,
    /// The node whose InternalIP has this MAC, when it is one of the cluster's (another
    /// load balancer's speaker on that node, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "node_name_schema")]
    pub node: Option<String>,
    /// It answered before the node announced the IP (RFC 5227 probe, or the check after
    /// a takeover): the node holds back rather than fight it, does not announce the IP,
    /// and probes again every few seconds. False: the node announces the IP and this
    /// host answers too (found by a routine check): clients may reach either.
    #[serde(default)]
    pub held_back: bool,
}

fn mac_schema(_: &mut SchemaGenerator) -> Schema {
    // aa:bb:cc:dd:ee:ff
    json_schema!({"type": "string", "maxLength": 17})
}

fn interfaces_schema(_: &mut SchemaGenerator) -> Schema {
    // Linux interface names: at most 15 characters (IFNAMSIZ - 1).
    json_schema!({"type": "array", "maxItems": MAX_INTERFACES,
        "items": {"type": "string", "maxLength": 15}})
}

fn services_schema(_: &mut SchemaGenerator) -> Schema {
    // namespace (63) / name (63).
    json_schema!({"type": "array", "maxItems": MAX_SERVICES_PER_IP,
        "items": {"type": "string", "maxLength": 127}})
}

impl NodeAnnouncementSpec {
    /// The spec listing `ips`, sorted by IP, cut to what fits [`MAX_SPEC_BYTES`] and the
    /// CRD's bounds; also how many IPs were left out.
    pub fn bounded(mut ips: Vec<AnnouncedIP>) -> (NodeAnnouncementSpec, usize) {
        ips.sort_by(|a, b| a.ip.cmp(&b.ip));
        let mut size = 0;
        let mut kept = Vec::with_capacity(ips.len().min(MAX_IPS));
        let total = ips.len();
        for mut ip in ips {
            ip.interfaces.truncate(MAX_INTERFACES);
            ip.services.truncate(MAX_SERVICES_PER_IP);
            let bytes = serde_json::to_vec(&ip).map_or(usize::MAX, |b| b.len() + 1);
            if kept.len() >= MAX_IPS || size + bytes > MAX_SPEC_BYTES {
                break;
            }
            size += bytes;
            kept.push(ip);
        }
        let left_out = total - kept.len();
        let count = kept.len() as i32;
        (
            NodeAnnouncementSpec {
                ips: kept,
                count,
                kube_proxy_failing: None,
                kernel_answers_arp: None,
            },
            left_out,
        )
    }
}

pub const REASON_ASSIGNED: &str = "NodeAssigned";
pub const REASON_NONE: &str = "NoEligibleNode";
/// Another host answers for the IP, so the node elected to announce it holds back.
pub const REASON_CONFLICT: &str = "ConflictingResponder";

/// The condition type for an IP's family.
pub fn condition_type(ip: IpAddr) -> &'static str {
    match Family::of(ip) {
        Family::V4 => "ferrolb.io/AnnouncedIPv4",
        Family::V6 => "ferrolb.io/AnnouncedIPv6",
    }
}

/// The condition's (status, reason, message) for `ip`, announced by `node` on
/// `interfaces` (none: no node may announce it now, as `node` said last), with `other`
/// answering for it too, or instead (held back).
pub fn condition_text(
    ip: IpAddr,
    interfaces: &[String],
    other: Option<&OtherResponder>,
    node: &str,
) -> (&'static str, &'static str, String) {
    let other = other.filter(|_| !interfaces.is_empty());
    let (mac, on) = other.map_or((String::new(), String::new()), |o| {
        let on = o.node.as_ref().map(|n| format!(" (node {n})"));
        (o.mac.clone(), on.unwrap_or_default())
    });
    if other.is_some_and(|o| !o.held_back) {
        (
            "True",
            REASON_CONFLICT,
            format!(
                "{} on {}, and another host answers for it too, MAC {mac}{on}: clients may reach either (a router, keepalived or another load balancer's speaker configured with the IP)",
                announced_by(ip, node),
                interfaces.join(", ")
            ),
        )
    } else if other.is_some() {
        (
            "False",
            REASON_CONFLICT,
            format!(
                "{ip} is answered by another host, MAC {mac}{on}, not by ferrolb: {node}, elected to announce it, holds back and probes again every few seconds (another load balancer's speaker still running, or a host configured with the IP)"
            ),
        )
    } else if interfaces.is_empty() {
        (
            "False",
            REASON_NONE,
            format!(
                "{ip} is announced by no node: none is eligible (node selectors, the exclusion label, NotReady, or no ready local endpoint)"
            ),
        )
    } else {
        (
            "True",
            REASON_ASSIGNED,
            format!("{} on {}", announced_by(ip, node), interfaces.join(", ")),
        )
    }
}

fn announced_by(ip: IpAddr, node: &str) -> String {
    format!("{ip} is announced by {node}")
}

/// Whether `condition` is the one written when `node` announces `ip` (on whichever
/// interfaces): how `ferrolb why` finds the announcing node without parsing the text.
pub fn reports(condition: &Condition, ip: IpAddr, node: &str) -> bool {
    condition.type_ == condition_type(ip)
        && condition.status == "True"
        && condition.reason == REASON_ASSIGNED
        && condition
            .message
            .strip_prefix(&announced_by(ip, node))
            .is_some_and(|rest| rest.starts_with(" on "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn written(ip: IpAddr, status: &str, reason: &str, message: String) -> Condition {
        Condition {
            type_: condition_type(ip).into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Time(Timestamp::now()),
            observed_generation: None,
        }
    }

    #[test]
    fn the_written_condition_names_its_node_and_no_other() {
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let interfaces = vec!["eth0".to_string(), "eth1".to_string()];
        let (status, reason, message) = condition_text(ip, &interfaces, None, "node-a");
        assert_eq!(message, "192.0.2.10 is announced by node-a on eth0, eth1");
        let condition = written(ip, status, reason, message);
        assert!(reports(&condition, ip, "node-a"));
        // A node whose name the owner's begins with, another IP, or no owner at all.
        assert!(!reports(&condition, ip, "node"));
        assert!(!reports(&condition, "192.0.2.1".parse().unwrap(), "node-a"));
        let (status, reason, message) = condition_text(ip, &[], None, "node-a");
        let none = written(ip, status, reason, message);
        assert!(!reports(&none, ip, "node-a"));
    }

    #[test]
    fn a_node_holding_back_names_the_mac_that_answers_and_does_not_report_announcing() {
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let eth0 = vec!["eth0".to_string()];
        let held = OtherResponder {
            mac: "02:00:00:00:00:0b".into(),
            node: Some("node-b".into()),
            held_back: true,
        };
        let (status, reason, message) = condition_text(ip, &eth0, Some(&held), "node-a");
        assert_eq!((status, reason), ("False", REASON_CONFLICT));
        assert!(
            message.starts_with(
                "192.0.2.10 is answered by another host, MAC 02:00:00:00:00:0b (node node-b), not by ferrolb: node-a"
            ),
            "{message}"
        );
        assert!(message.contains("node-a"));
        assert!(!reports(
            &written(ip, status, reason, message),
            ip,
            "node-a"
        ));
        // A node that gave the IP up says so, whatever it heard before.
        let (_, reason, _) = condition_text(ip, &[], Some(&held), "node-a");
        assert_eq!(reason, REASON_NONE);
    }

    #[test]
    fn a_node_that_announces_an_ip_another_host_answers_for_too_says_both() {
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let eth0 = vec!["eth0".to_string()];
        let too = OtherResponder {
            mac: "02:00:00:00:00:0b".into(),
            node: None,
            held_back: false,
        };
        let (status, reason, message) = condition_text(ip, &eth0, Some(&too), "node-a");
        assert_eq!((status, reason), ("True", REASON_CONFLICT));
        assert!(message.starts_with(
            "192.0.2.10 is announced by node-a on eth0, and another host answers for it too, MAC 02:00:00:00:00:0b"
        ));
        // Not the plain "announced" a healthy IP shows, which `why` follows to the node.
        assert!(!reports(
            &written(ip, status, reason, message),
            ip,
            "node-a"
        ));
    }

    fn entry(ip: String, service: String, interface: &str) -> AnnouncedIP {
        AnnouncedIP {
            ip,
            interfaces: vec![interface.to_string()],
            services: vec![service],
            since: MicroTime(Timestamp::now()),
            other_responder: None,
        }
    }

    /// The size limit in Services per node (one Service per IP), printed for the docs:
    /// `cargo test -p ferrolb-api the_size_budget -- --nocapture`.
    #[test]
    fn the_size_budget_in_services() {
        let typical = |i: u32| {
            entry(
                format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
                format!("shop/web-frontend-{i}"),
                "eth0",
            )
        };
        let longest = |i: u32| {
            entry(
                format!(
                    "fd00:ffff:ffff:ffff:ffff:ffff:{:04x}:{:04x}",
                    i >> 16,
                    i & 0xffff
                ),
                format!("{}/{}", "n".repeat(63), "s".repeat(63)),
                "enp129s0f1.4094",
            )
        };
        for (what, make, at_least) in [
            (
                "typical names",
                &typical as &dyn Fn(u32) -> AnnouncedIP,
                8_000,
            ),
            ("the longest names", &longest, 3_500),
        ] {
            let (spec, left_out) = NodeAnnouncementSpec::bounded((0..20_000).map(make).collect());
            let bytes = serde_json::to_vec(&spec).unwrap().len();
            println!(
                "{what}: {} Services per node fit in {bytes} bytes ({left_out} left out)",
                spec.ips.len()
            );
            assert!(spec.ips.len() >= at_least, "{what}: {}", spec.ips.len());
            assert!(bytes <= MAX_SPEC_BYTES + 64);
            assert_eq!(spec.count as usize, spec.ips.len());
            assert_eq!(left_out, 20_000 - spec.ips.len());
        }
        // Everything fits when it fits: nothing is left out.
        let (spec, left_out) = NodeAnnouncementSpec::bounded((0..100).map(typical).collect());
        assert_eq!((spec.ips.len(), left_out), (100, 0));
    }
}
