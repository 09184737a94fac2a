//! The speaker's Prometheus metrics: what it answered and announced on each interface,
//! which IPs it owns, how often ownership moved, what membership sees and whether the
//! API server's objects are current; and the MetalLB speaker metrics that mean the same
//! thing, under MetalLB's names and labels (so that MetalLB dashboards and alerts keep
//! working).

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
pub struct IpLabels {
    pub ip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnnouncedLabels {
    pub ip: String,
    pub interface: String,
}

/// MetalLB's `metallb_speaker_announced` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MetallbAnnouncedLabels {
    /// `namespace/name`.
    pub service: String,
    /// Always `layer2`.
    pub protocol: String,
    pub node: String,
    pub ip: String,
}

pub struct Metrics {
    registry: Registry,
    /// ARP requests for an IP this node answers for.
    pub arp_requests: Family<InterfaceLabels, Counter>,
    pub arp_replies: Family<InterfaceLabels, Counter>,
    /// 1 per interface where ARP for announced IPs is answered in the kernel; 0 where
    /// the speaker answers it (the kernel responder could not be attached, or is off).
    pub arp_in_kernel: Family<InterfaceLabels, Gauge>,
    /// Neighbor Solicitations for an IP this node answers for.
    pub ns_requests: Family<InterfaceLabels, Counter>,
    pub na_replies: Family<InterfaceLabels, Counter>,
    /// Gratuitous ARPs and unsolicited Neighbor Advertisements.
    pub announcements: Family<InterfaceLabels, Counter>,
    pub conflicts: Counter,
    /// 1 per IP and interface this node answers on.
    pub announced: Family<AnnouncedLabels, Gauge>,
    /// Per IP this node owns: how many hosts answer for it, this one included (2 or
    /// more: another host answers too; the node's log and the Service's condition name
    /// its MAC).
    pub vip_responders: Family<IpLabels, Gauge>,
    /// IPs this node took or gave up.
    pub ownership_changes: Counter,
    /// From a peer being declared down to this node answering for its IPs.
    pub failover_seconds: Histogram,
    /// One pass from the objects and membership to this node's announcements.
    pub plan_seconds: Histogram,
    pub members: Gauge,
    pub members_declared_down: Counter,
    /// Times the peers declared this node down.
    pub declared_down_by_peers: Counter,
    /// Times this node was cut off within the damping window (each doubles its hold).
    pub recent_cut_offs: Gauge,
    /// 1 once this node may take IPs back from others; 0 during its hold-down.
    pub settled: Gauge,
    pub membership_rejected: Counter,
    /// Authenticated membership datagrams dropped as replays or over a sender's allowance.
    pub membership_replayed: Counter,
    /// 1 when membership is sealed with a keyring; 0 when it runs unencrypted.
    pub membership_encrypted: Gauge,
    /// 1 while every watch of the API server has listed and none is failing.
    pub api_connected: Gauge,
    /// 1 while kube-proxy on this node passes its health check, or it is not checked.
    pub kube_proxy_healthy: Gauge,
    /// VIPs this node's kernel answers ARP for though it does not announce them.
    pub vips_answered_by_kernel: Gauge,
    /// MetalLB's `metallb_speaker_announced`: 1 per Service and IP this node announces.
    pub metallb_announced: Family<MetallbAnnouncedLabels, Gauge>,
    /// MetalLB's `metallb_k8s_client_config_loaded_bool`: 1 once every watch has listed.
    pub metallb_config_loaded: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            arp_requests: Family::default(),
            arp_replies: Family::default(),
            arp_in_kernel: Family::default(),
            ns_requests: Family::default(),
            na_replies: Family::default(),
            announcements: Family::default(),
            conflicts: Counter::default(),
            announced: Family::default(),
            vip_responders: Family::default(),
            ownership_changes: Counter::default(),
            failover_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            plan_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            members: Gauge::default(),
            recent_cut_offs: Gauge::default(),
            declared_down_by_peers: Counter::default(),
            settled: Gauge::default(),
            members_declared_down: Counter::default(),
            membership_rejected: Counter::default(),
            membership_replayed: Counter::default(),
            membership_encrypted: Gauge::default(),
            api_connected: Gauge::default(),
            kube_proxy_healthy: Gauge::default(),
            vips_answered_by_kernel: Gauge::default(),
            metallb_announced: Family::default(),
            metallb_config_loaded: Gauge::default(),
        };
        root.register(
            "metallb_speaker_announced",
            "Services being announced from this node (MetalLB's name)",
            m.metallb_announced.clone(),
        );
        root.register(
            "metallb_k8s_client_config_loaded_bool",
            "1 once the objects were listed from the API server (MetalLB's name)",
            m.metallb_config_loaded.clone(),
        );
        let r = root.sub_registry_with_prefix("ferrolb_speaker");
        r.register(
            "arp_requests",
            "ARP requests received for IPs this node answers for",
            m.arp_requests.clone(),
        );
        r.register(
            "arp_replies",
            "ARP replies sent (by the speaker and by its kernel responder)",
            m.arp_replies.clone(),
        );
        r.register(
            "arp_in_kernel",
            "1 where ARP for announced IPs is answered in the kernel; 0 where the speaker answers it in user space",
            m.arp_in_kernel.clone(),
        );
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
        m.kube_proxy_healthy.set(1);
        r.register(
            "kube_proxy_healthy",
            "1 while kube-proxy on this node passes its health check (or it is not checked); 0: the node's IPs are announced by others",
            m.kube_proxy_healthy.clone(),
        );
        r.register(
            "vips_answered_by_kernel",
            "VIPs this node's kernel answers ARP for though it does not announce them (kube-proxy IPVS mode without strictARP); should be 0",
            m.vips_answered_by_kernel.clone(),
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
            "vip_responders",
            "hosts that answer for each IP this node owns, this node included when it announces it",
            m.vip_responders.clone(),
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
            "membership_declared_down_by_peers",
            "Times the other speakers declared this one down (it rejoined each time): a flaky link, a partition, or a stall",
            m.declared_down_by_peers.clone(),
        );
        r.register(
            "membership_recent_cut_offs",
            "Times this node was cut off from the others (its link lost a subnet, or its peers declared it down while it was on the smaller side) within the damping window; each doubles the hold before it takes IPs back",
            m.recent_cut_offs.clone(),
        );
        r.register(
            "membership_settled",
            "1 once this node may take IPs back from others; 0 during its (damped) hold-down",
            m.settled.clone(),
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
        r.register(
            "membership_replayed_datagrams",
            "Authenticated membership datagrams dropped as replays (seen already or too old) or over their sender's rate",
            m.membership_replayed.clone(),
        );
        r.register(
            "membership_encrypted",
            "1 when membership is sealed with a keyring; 0 when it runs unencrypted and anyone on the network can forge it",
            m.membership_encrypted.clone(),
        );
        r.register(
            "api_connected",
            "1 while every watch of the API server has listed and none is failing; 0 while this node answers on the last objects it saw",
            m.api_connected.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
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
        others: &crate::responder::Others,
    ) {
        self.announced.clear();
        for (ip, interfaces) in owned {
            // Held back where another host answers for it: not announced there.
            for interface in interfaces
                .iter()
                .filter(|i| !others.get(&(*ip, (*i).clone())).is_some_and(|o| o.held))
            {
                self.announced
                    .get_or_create(&AnnouncedLabels {
                        ip: ip.to_string(),
                        interface: interface.clone(),
                    })
                    .set(1);
            }
        }
    }

    /// Sets `vip_responders` to exactly the IPs of `owned` that this node announces or
    /// holds back.
    pub fn set_responders(&self, owned: &[crate::daemon::Ownership]) {
        self.vip_responders.clear();
        for o in owned.iter().filter(|o| !o.interfaces.is_empty()) {
            let us = u8::from(!o.other.as_ref().is_some_and(|o| o.held_back));
            let others = u8::from(o.other.is_some());
            self.vip_responders
                .get_or_create(&IpLabels {
                    ip: o.ip.to_string(),
                })
                .set(i64::from(us + others));
        }
    }

    /// Sets MetalLB's `metallb_speaker_announced` to exactly the Services on `owned`
    /// (IP, and the Services on it), announced from `node`.
    pub fn set_services_announced<'a>(
        &self,
        node: &str,
        owned: impl IntoIterator<Item = (&'a IpAddr, &'a [ferrolb_allocator::ServiceKey])>,
    ) {
        self.metallb_announced.clear();
        for (ip, services) in owned {
            for service in services {
                self.metallb_announced
                    .get_or_create(&MetallbAnnouncedLabels {
                        service: service.to_string(),
                        protocol: "layer2".into(),
                        node: node.to_string(),
                        ip: ip.to_string(),
                    })
                    .set(1);
            }
        }
    }

    /// Counts up to `total`, a running total kept elsewhere (membership's count of
    /// rejected datagrams, which starts again at 0 when membership restarts).
    pub fn count_to(counter: &Counter, total: u64, last: &mut u64) {
        if total >= *last {
            counter.inc_by(total - *last);
        } else {
            counter.inc_by(total);
        }
        *last = total;
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_allocator::ServiceKey;

    /// By the Prometheus conventions: a gauge is never named `_total`, a counter always
    /// is (prometheus-client adds it).
    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::default();
        let mut last = 0;
        Metrics::count_to(&m.membership_rejected, 4, &mut last);
        Metrics::count_to(&m.membership_rejected, 6, &mut last);
        // Membership restarted: its count starts again.
        Metrics::count_to(&m.membership_rejected, 1, &mut last);
        let text = m.encode();
        let misnamed = ferrolb_kubernetes::http::gauges_named_like_counters(&text);
        assert!(
            misnamed.is_empty(),
            "gauges named like counters: {misnamed:?}"
        );
        assert!(
            text.contains("ferrolb_speaker_membership_rejected_datagrams_total 7"),
            "{text}"
        );
    }

    #[test]
    fn metallb_announced_carries_metallbs_labels() {
        let m = Metrics::default();
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let services = [ServiceKey::new("default", "web")];
        m.set_services_announced("n1", [(&ip, &services[..])]);
        let text = m.encode();
        assert!(
            text.contains("metallb_speaker_announced{service=\"default/web\",protocol=\"layer2\",node=\"n1\",ip=\"192.0.2.10\"} 1"),
            "{text}"
        );
        m.set_services_announced("n1", []);
        assert!(!m.encode().contains("default/web"));
    }
}
