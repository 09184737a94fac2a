//! The speaker's Prometheus metrics: what it answered and announced on each interface,
//! which IPs it owns, how often ownership moved, and what membership sees.

use std::net::IpAddr;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InterfaceLabels {
    pub interface: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnnouncedLabels {
    pub ip: String,
    pub interface: String,
}

pub struct Metrics {
    registry: Registry,
    /// ARP requests for an IP this node answers for.
    pub arp_requests: Family<InterfaceLabels, Counter>,
    pub arp_replies: Family<InterfaceLabels, Counter>,
    /// Neighbor Solicitations for an IP this node answers for.
    pub ns_requests: Family<InterfaceLabels, Counter>,
    pub na_replies: Family<InterfaceLabels, Counter>,
    /// Gratuitous ARPs and unsolicited Neighbor Advertisements.
    pub announcements: Family<InterfaceLabels, Counter>,
    pub conflicts: Counter,
    /// 1 per IP and interface this node answers on.
    pub announced: Family<AnnouncedLabels, Gauge>,
    /// IPs this node took or gave up.
    pub ownership_changes: Counter,
    /// From a peer being declared down to this node answering for its IPs.
    pub failover_seconds: Histogram,
    /// One pass from the objects and membership to this node's announcements.
    pub plan_seconds: Histogram,
    pub members: Gauge,
    pub members_declared_down: Counter,
    pub membership_rejected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferrolb_speaker");
        let m = Metrics {
            registry: Registry::default(),
            arp_requests: Family::default(),
            arp_replies: Family::default(),
            ns_requests: Family::default(),
            na_replies: Family::default(),
            announcements: Family::default(),
            conflicts: Counter::default(),
            announced: Family::default(),
            ownership_changes: Counter::default(),
            failover_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            plan_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            members: Gauge::default(),
            members_declared_down: Counter::default(),
            membership_rejected: Gauge::default(),
        };
        let r = &mut registry;
        r.register(
            "arp_requests",
            "ARP requests received for IPs this node answers for",
            m.arp_requests.clone(),
        );
        r.register("arp_replies", "ARP replies sent", m.arp_replies.clone());
        r.register(
            "ns_requests",
            "Neighbor Solicitations received for IPs this node answers for",
            m.ns_requests.clone(),
        );
        r.register(
            "na_replies",
            "Neighbor Advertisements sent in reply",
            m.na_replies.clone(),
        );
        r.register(
            "gratuitous_announcements",
            "Gratuitous ARPs and unsolicited Neighbor Advertisements sent",
            m.announcements.clone(),
        );
        r.register(
            "conflicts",
            "Answers from another host for an IP this node probed or announces",
            m.conflicts.clone(),
        );
        r.register(
            "announced",
            "1 for each IP and interface this node answers on",
            m.announced.clone(),
        );
        r.register(
            "ownership_changes",
            "IPs this node took over or gave up",
            m.ownership_changes.clone(),
        );
        r.register(
            "failover_seconds",
            "From a peer declared down to this node answering for its IPs",
            m.failover_seconds.clone(),
        );
        r.register(
            "plan_seconds",
            "One pass from the objects and membership to this node's announcements",
            m.plan_seconds.clone(),
        );
        r.register(
            "members",
            "Speakers alive in membership, this one included",
            m.members.clone(),
        );
        r.register(
            "members_declared_down",
            "Peers membership declared down",
            m.members_declared_down.clone(),
        );
        r.register(
            "membership_rejected_datagrams",
            "Membership datagrams that failed authentication",
            m.membership_rejected.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn interface(name: &str) -> InterfaceLabels {
        InterfaceLabels {
            interface: name.to_string(),
        }
    }

    /// Sets the announced IPs to exactly `owned`.
    pub fn set_announced<'a>(
        &self,
        owned: impl IntoIterator<Item = (&'a IpAddr, &'a Vec<String>)>,
    ) {
        self.announced.clear();
        for (ip, interfaces) in owned {
            for interface in interfaces {
                self.announced
                    .get_or_create(&AnnouncedLabels {
                        ip: ip.to_string(),
                        interface: interface.clone(),
                    })
                    .set(1);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
