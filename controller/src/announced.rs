//! Which node announces each Service's IPs, as the Service's
//! `ferrolb.io/AnnouncedIPv4`/`IPv6` condition, decided from the nodes' records
//! ([`NodeAnnouncement`], one per node, each written by that node's speaker only).
//!
//! Pure, like the reconciler: records and Services in, [`ConditionWrite`]s out.
//!
//! * A record speaks only for its own node (its name), and only about the IPs in the
//!   Service's `status.loadBalancer.ingress`: a claim on any other IP or Service is
//!   ignored, so a node can neither name another node nor write on Services that are
//!   not ferrolb's.
//! * When several nodes claim one IP (a failover whose old owner died before it could
//!   update its record, or a split cluster) the newest claim (`since`) is shown, as the
//!   last node to take the IP over wrote it before records existed; ties go to the first
//!   node by name, so every controller decides the same.
//! * No claim at all (the owner left gracefully and its successor has not written yet)
//!   changes nothing: the condition keeps saying what it said.
//! * Writes follow changes: a condition is written only when its text changes, and a
//!   Service event older than this controller's own write does not count as a change.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_allocator::ServiceKey;
use ferrolb_allocator::input::{self, ingress_ips};
use ferrolb_api::announcement::{condition_text, condition_type};
use ferrolb_api::{NodeAnnouncement, OtherResponder};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;

/// One condition to write on a Service, and the Event that tells of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionWrite {
    pub key: ServiceKey,
    pub uid: Option<String>,
    pub type_: &'static str,
    /// `True` (announced) or `False` (no node may announce it now).
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
    /// Which field manager writes it: one per family, so writing one leaves the other.
    pub ipv6: bool,
}

/// One node's claim on one IP of one Service.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Claim {
    interfaces: Vec<String>,
    since: Timestamp,
    /// Another host that answers for the IP, as the node heard it.
    other: Option<OtherResponder>,
}

#[derive(Clone, Debug, Default)]
struct Shown {
    uid: Option<String>,
    ips: Vec<IpAddr>,
    /// The ferrolb conditions' messages, by type.
    conditions: BTreeMap<&'static str, String>,
    /// The Service's resourceVersion after this controller's last write: events older
    /// than it show the Service from before that write.
    written: Option<u64>,
}

/// The records and what the Services show. See the [module docs](self).
#[derive(Default)]
pub struct Announced {
    started: bool,
    /// Claims by Service and IP, then by node.
    claims: BTreeMap<(ServiceKey, IpAddr), BTreeMap<String, Claim>>,
    /// What each node's record claims, to replace it when the record changes.
    by_node: BTreeMap<String, BTreeSet<(ServiceKey, IpAddr)>>,
    /// The IPs each node holds back because another host answered for them first.
    held: BTreeMap<String, BTreeMap<IpAddr, OtherResponder>>,
    services: BTreeMap<ServiceKey, Shown>,
}

impl Announced {
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// Every Service and record has been listed: decides everything once.
    pub fn start(&mut self) -> Vec<ConditionWrite> {
        self.started = true;
        let keys: BTreeSet<ServiceKey> = self.claims.keys().map(|(k, _)| k.clone()).collect();
        keys.iter().flat_map(|k| self.decide(k)).collect()
    }

    /// A node's record was created or changed.
    pub fn record_applied(&mut self, record: &NodeAnnouncement) -> Vec<ConditionWrite> {
        let Some(node) = record.metadata.name.clone() else {
            return Vec::new();
        };
        let mut claims: BTreeMap<(ServiceKey, IpAddr), Claim> = BTreeMap::new();
        let mut held = BTreeMap::new();
        for entry in &record.spec.ips {
            // Hostile input: what does not parse is skipped, not guessed at.
            let Ok(ip) = entry.ip.parse::<IpAddr>() else {
                continue;
            };
            let claim = Claim {
                interfaces: entry.interfaces.clone(),
                since: entry.since.0,
                other: entry.other_responder.as_ref().and_then(checked_responder),
            };
            if let Some(other) = claim.other.as_ref().filter(|o| o.held_back) {
                held.insert(ip, other.clone());
            }
            for service in &entry.services {
                if let Some((namespace, name)) = service.split_once('/') {
                    let key = ServiceKey {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                    };
                    claims.insert((key, ip), claim.clone());
                }
            }
        }
        let mut changed: BTreeSet<ServiceKey> = BTreeSet::new();
        for (at, claim) in &claims {
            let by = self.claims.entry(at.clone()).or_default();
            if by.get(&node) != Some(claim) {
                by.insert(node.clone(), claim.clone());
                changed.insert(at.0.clone());
            }
        }
        if held.is_empty() {
            self.held.remove(&node);
        } else {
            self.held.insert(node.clone(), held);
        }
        let now: BTreeSet<(ServiceKey, IpAddr)> = claims.into_keys().collect();
        let before = self.by_node.insert(node.clone(), now.clone());
        for at in before.unwrap_or_default().difference(&now) {
            self.forget(at, &node);
            changed.insert(at.0.clone());
        }
        self.decide_all(&changed)
    }

    /// A node's record was deleted (its speaker left, or its Node was deleted).
    pub fn record_deleted(&mut self, node: &str) -> Vec<ConditionWrite> {
        self.held.remove(node);
        let mut changed = BTreeSet::new();
        for at in self.by_node.remove(node).unwrap_or_default() {
            self.forget(&at, node);
            changed.insert(at.0);
        }
        self.decide_all(&changed)
    }

    /// A LoadBalancer Service was created or changed (or came back from a write).
    pub fn service_applied(&mut self, svc: &Service) -> Vec<ConditionWrite> {
        let key = input::service_key(svc);
        let version = svc
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse::<u64>().ok());
        let shown = self.services.entry(key.clone()).or_default();
        shown.uid = svc.metadata.uid.clone();
        shown.ips = ingress_ips(svc);
        let stale = matches!((shown.written, version), (Some(w), Some(v)) if v < w);
        if !stale {
            shown.conditions = svc
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|c| {
                    let type_ = [
                        condition_type(IpAddr::from([0, 0, 0, 0])),
                        condition_type(IpAddr::from([0u16; 8])),
                    ]
                    .into_iter()
                    .find(|t| *t == c.type_)?;
                    Some((type_, c.message.clone()))
                })
                .collect();
        }
        self.decide(&key)
    }

    /// The IPs some node holds back because another host answered for them first, with
    /// who answered (`MAC 02:42:ac:12:00:0b (node node-c)`): for the pools' conditions.
    /// Only the IPs the controller gave out count there, so a record cannot name others.
    pub fn taken(&self) -> BTreeMap<IpAddr, String> {
        let mut taken = BTreeMap::new();
        for held in self.held.values() {
            for (ip, other) in held {
                taken.entry(*ip).or_insert_with(|| match &other.node {
                    Some(node) => format!("MAC {} (node {node})", other.mac),
                    None => format!("MAC {}", other.mac),
                });
            }
        }
        taken
    }

    pub fn service_deleted(&mut self, key: &ServiceKey) {
        self.services.remove(key);
    }

    /// A condition was written; `version` is the Service's resourceVersion after it.
    pub fn written(&mut self, write: &ConditionWrite, version: Option<u64>) {
        if let Some(shown) = self.services.get_mut(&write.key) {
            shown.conditions.insert(write.type_, write.message.clone());
            shown.written = version.or(shown.written);
        }
    }

    /// The writes one Service still needs, for a retry after a failed write.
    pub fn resync(&self, key: &ServiceKey) -> Vec<ConditionWrite> {
        self.decide(key)
    }

    fn forget(&mut self, at: &(ServiceKey, IpAddr), node: &str) {
        if let Some(by) = self.claims.get_mut(at) {
            by.remove(node);
            if by.is_empty() {
                self.claims.remove(at);
            }
        }
    }

    fn decide_all(&self, keys: &BTreeSet<ServiceKey>) -> Vec<ConditionWrite> {
        keys.iter().flat_map(|k| self.decide(k)).collect()
    }

    /// The writes that make one Service's conditions say who announces its IPs.
    fn decide(&self, key: &ServiceKey) -> Vec<ConditionWrite> {
        let Some(shown) = self.services.get(key).filter(|_| self.started) else {
            return Vec::new();
        };
        let mut writes = Vec::new();
        for ip in &shown.ips {
            let Some(by) = self.claims.get(&(key.clone(), *ip)) else {
                continue;
            };
            // The newest claim; among equally new ones, the first node by name.
            let Some((node, claim)) = by.iter().rev().max_by_key(|(_, c)| c.since) else {
                continue;
            };
            let type_ = condition_type(*ip);
            let (status, reason, message) =
                condition_text(*ip, &claim.interfaces, claim.other.as_ref(), node);
            if shown.conditions.get(type_) == Some(&message) {
                continue;
            }
            writes.push(ConditionWrite {
                key: key.clone(),
                uid: shown.uid.clone(),
                type_,
                status,
                reason,
                message,
                ipv6: ip.is_ipv6(),
            });
        }
        writes
    }
}

/// Hostile input again: what reaches a Service's condition is a MAC and a node name,
/// or nothing (a node name that is not one is dropped, a MAC that is not one drops all).
fn checked_responder(other: &OtherResponder) -> Option<OtherResponder> {
    is_mac(&other.mac).then(|| OtherResponder {
        mac: other.mac.clone(),
        node: other.node.clone().filter(|n| is_node_name(n)),
        held_back: other.held_back,
    })
}

/// A Node's name: a DNS subdomain (lowercase letters, digits, `-` and `.`, at most 253).
fn is_node_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// `aa:bb:cc:dd:ee:ff`, hexadecimal.
fn is_mac(s: &str) -> bool {
    s.len() == 17
        && s.split(':').count() == 6
        && s.split(':')
            .all(|b| b.len() == 2 && b.chars().all(|c| c.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(node: &str, ips: &[(&str, &[&str], &str, i64)]) -> NodeAnnouncement {
        let ips: Vec<_> = ips
            .iter()
            .map(|(ip, interfaces, service, since)| {
                json!({"ip": ip, "interfaces": interfaces, "services": [service],
                       "since": Timestamp::from_second(*since).unwrap().to_string()})
            })
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "ferrolb.io/v1beta1", "kind": "NodeAnnouncement",
            "metadata": {"name": node, "namespace": "ferrolb-system"},
            "spec": {"ips": ips, "count": ips.len()},
        }))
        .unwrap()
    }

    fn service(name: &str, version: &str, ips: &[&str], message: Option<&str>) -> Service {
        let conditions: Vec<_> = message
            .into_iter()
            .map(|m| json!({"type": "ferrolb.io/AnnouncedIPv4", "status": "True",
                "reason": "NodeAssigned", "message": m, "lastTransitionTime": "2026-01-01T00:00:00Z"}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": version, "uid": "u"},
            "spec": {"type": "LoadBalancer"},
            "status": {"loadBalancer": {"ingress": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()},
                       "conditions": conditions},
        }))
        .unwrap()
    }

    fn messages(writes: &[ConditionWrite]) -> Vec<String> {
        writes.iter().map(|w| w.message.clone()).collect()
    }

    fn started(
        services: &[Service],
        records: &[NodeAnnouncement],
    ) -> (Announced, Vec<ConditionWrite>) {
        let mut a = Announced::default();
        for s in services {
            assert!(a.service_applied(s).is_empty(), "nothing before start");
        }
        for r in records {
            assert!(a.record_applied(r).is_empty(), "nothing before start");
        }
        let writes = a.start();
        (a, writes)
    }

    #[test]
    fn a_record_becomes_the_condition_once() {
        let (mut a, writes) = started(
            &[service("web", "5", &["192.0.2.10"], None)],
            &[record(
                "node-a",
                &[("192.0.2.10", &["eth0"], "default/web", 100)],
            )],
        );
        assert_eq!(
            messages(&writes),
            ["192.0.2.10 is announced by node-a on eth0"]
        );
        assert_eq!(
            (writes[0].status, writes[0].reason),
            ("True", "NodeAssigned")
        );
        a.written(&writes[0], Some(6));
        // The same record again, or a Service event from before the write: no write.
        let again = record("node-a", &[("192.0.2.10", &["eth0"], "default/web", 100)]);
        assert!(a.record_applied(&again).is_empty());
        assert!(
            a.service_applied(&service("web", "5", &["192.0.2.10"], None))
                .is_empty()
        );
        // The write, seen by the watch.
        let seen = service(
            "web",
            "6",
            &["192.0.2.10"],
            Some("192.0.2.10 is announced by node-a on eth0"),
        );
        assert!(a.service_applied(&seen).is_empty());
    }

    /// A node that hears another host answer for the IP says so, and the condition
    /// names that host's MAC instead of calling the IP announced; once the node takes the
    /// IP, the condition says so. A malformed MAC is not repeated on the Service.
    #[test]
    fn a_node_holding_back_turns_into_a_conflicting_responder_condition() {
        let held = |mac: &str| {
            let mut r = record("node-a", &[("192.0.2.10", &["eth0"], "default/web", 100)]);
            r.spec.ips[0].other_responder = Some(OtherResponder {
                mac: mac.to_string(),
                node: Some("node-b".to_string()),
                held_back: true,
            });
            r
        };
        let (mut a, writes) = started(
            &[service("web", "5", &["192.0.2.10"], None)],
            &[held("02:42:ac:12:00:0b")],
        );
        assert_eq!(
            (writes[0].status, writes[0].reason),
            ("False", "ConflictingResponder")
        );
        assert!(
            writes[0].message.starts_with(
                "192.0.2.10 is answered by another host, MAC 02:42:ac:12:00:0b (node node-b), not by ferrolb: node-a"
            ),
            "{}",
            writes[0].message
        );
        // The pools hear of it too.
        assert_eq!(
            a.taken(),
            BTreeMap::from([(
                "192.0.2.10".parse().unwrap(),
                "MAC 02:42:ac:12:00:0b (node node-b)".to_string()
            )])
        );
        a.written(&writes[0], Some(6));
        let taken = a.record_applied(&record(
            "node-a",
            &[("192.0.2.10", &["eth0"], "default/web", 200)],
        ));
        assert!(
            a.taken().is_empty(),
            "the node took it: nothing is held back"
        );
        assert_eq!(
            messages(&taken),
            ["192.0.2.10 is announced by node-a on eth0"]
        );
        a.written(&taken[0], Some(7));
        // Not a MAC: dropped, so the claim reads as announcing, which is shown already.
        assert!(a.record_applied(&held("<b>node-b</b> 1234")).is_empty());
    }

    #[test]
    fn a_condition_already_shown_is_not_written_after_a_restart() {
        let (_, writes) = started(
            &[service(
                "web",
                "5",
                &["192.0.2.10"],
                Some("192.0.2.10 is announced by node-a on eth0"),
            )],
            &[record(
                "node-a",
                &[("192.0.2.10", &["eth0"], "default/web", 100)],
            )],
        );
        assert!(writes.is_empty(), "{writes:?}");
    }

    #[test]
    fn the_newest_claim_wins_and_a_deleted_record_changes_nothing() {
        let (mut a, _) = started(
            &[service("web", "5", &["192.0.2.10"], None)],
            &[record(
                "node-a",
                &[("192.0.2.10", &["eth0"], "default/web", 100)],
            )],
        );
        // node-b takes over; node-a died and its record still claims the IP.
        let writes = a.record_applied(&record(
            "node-b",
            &[("192.0.2.10", &["eth1"], "default/web", 200)],
        ));
        assert_eq!(
            messages(&writes),
            ["192.0.2.10 is announced by node-b on eth1"]
        );
        a.written(&writes[0], Some(7));
        // node-b leaves gracefully: node-a's older claim is all that is left, and shown.
        let writes = a.record_deleted("node-b");
        assert_eq!(
            messages(&writes),
            ["192.0.2.10 is announced by node-a on eth0"]
        );
        a.written(&writes[0], Some(8));
        // No claim at all: the condition stays as it is.
        assert!(a.record_deleted("node-a").is_empty());
    }

    #[test]
    fn a_given_up_ip_says_no_node_announces_it() {
        let (mut a, _) = started(
            &[service("web", "5", &["192.0.2.10"], None)],
            &[record(
                "node-a",
                &[("192.0.2.10", &["eth0"], "default/web", 100)],
            )],
        );
        let writes = a.record_applied(&record(
            "node-a",
            &[("192.0.2.10", &[], "default/web", 150)],
        ));
        assert_eq!(writes.len(), 1);
        assert_eq!(
            (writes[0].status, writes[0].reason),
            ("False", "NoEligibleNode")
        );
        assert!(
            writes[0]
                .message
                .starts_with("192.0.2.10 is announced by no node")
        );
    }

    /// A node's record may claim anything: only IPs the Service holds count, and a
    /// record speaks for the node it is named after.
    #[test]
    fn claims_on_ips_a_service_does_not_hold_are_ignored() {
        let (mut a, writes) = started(
            &[
                service("web", "5", &["192.0.2.10"], None),
                service("db", "5", &[], None),
            ],
            &[record(
                "node-a",
                &[
                    ("192.0.2.99", &["eth0"], "default/web", 100),
                    ("192.0.2.10", &["eth0"], "default/db", 100),
                    ("192.0.2.10", &["eth0"], "kube-system/other", 100),
                    ("not an ip", &["eth0"], "default/web", 100),
                    ("192.0.2.10", &["eth0"], "no-slash", 100),
                ],
            )],
        );
        assert!(writes.is_empty(), "{writes:?}");
        assert!(a.record_deleted("node-a").is_empty());
    }

    #[test]
    fn each_family_has_its_own_condition() {
        let (_, writes) = started(
            &[service("web", "5", &["192.0.2.10", "2001:db8::10"], None)],
            &[
                record("node-a", &[("192.0.2.10", &["eth0"], "default/web", 100)]),
                record("node-b", &[("2001:db8::10", &["eth0"], "default/web", 100)]),
            ],
        );
        let mut got: Vec<(&str, bool, String)> = writes
            .iter()
            .map(|w| (w.type_, w.ipv6, w.message.clone()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                (
                    "ferrolb.io/AnnouncedIPv4",
                    false,
                    "192.0.2.10 is announced by node-a on eth0".to_string()
                ),
                (
                    "ferrolb.io/AnnouncedIPv6",
                    true,
                    "2001:db8::10 is announced by node-b on eth0".to_string()
                ),
            ]
        );
    }

    #[test]
    fn equally_new_claims_go_to_the_first_node_by_name() {
        let (_, writes) = started(
            &[service("web", "5", &["192.0.2.10"], None)],
            &[
                record("node-b", &[("192.0.2.10", &["eth0"], "default/web", 100)]),
                record("node-a", &[("192.0.2.10", &["eth0"], "default/web", 100)]),
            ],
        );
        assert_eq!(
            messages(&writes),
            ["192.0.2.10 is announced by node-a on eth0"]
        );
    }
}
