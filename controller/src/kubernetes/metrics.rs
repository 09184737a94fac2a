//! The controller's Prometheus metrics, and the MetalLB allocator metrics that mean
//! the same thing, under MetalLB's names and labels (so that MetalLB dashboards and
//! alerts keep working).

use ferrolb_kubernetes::error::ApiError;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use ferrolb_allocator::PoolUsage;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    pub family: IpFamily,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// MetalLB's label: the pool only (its families are separate metrics).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MetallbPoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: String,
}

impl From<&str> for TriggerLabels {
    fn from(trigger: &str) -> Self {
        TriggerLabels {
            trigger: trigger.to_string(),
        }
    }
}

/// What was written: `service_status`, `event` or `pool_status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

impl From<&str> for KindLabels {
    fn from(kind: &str) -> Self {
        KindLabels {
            kind: kind.to_string(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiErrorLabels {
    pub resource: String,
    pub verb: String,
    /// [`ApiError::label`]: not_found, conflict, forbidden, gone, invalid, transient.
    pub error: &'static str,
}

type PoolGauge = Family<MetallbPoolLabels, Gauge<f64, AtomicU64>>;

/// MetalLB's `metallb_allocator_*` gauges, per pool: both families, IPv4, IPv6.
#[derive(Default)]
pub struct MetallbAllocator {
    pub addresses_in_use: [PoolGauge; 3],
    pub addresses: [PoolGauge; 3],
}

pub struct Metrics {
    pub registry: Registry,
    pub addresses_in_use: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub addresses_capacity: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub allocation_failures: Family<ReasonLabels, Counter>,
    pub reconciles: Family<TriggerLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub api_errors: Family<ApiErrorLabels, Counter>,
    pub writes: Family<KindLabels, Counter>,
    pub leader: Gauge,
    pub pending_services: Gauge,
    pub stranded_services: Gauge,
    pub metallb: MetallbAllocator,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut root = Registry::default();
        let m = Metrics {
            addresses_in_use: Family::default(),
            addresses_capacity: Family::default(),
            allocation_failures: Family::default(),
            reconciles: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            api_errors: Family::default(),
            writes: Family::default(),
            leader: Gauge::default(),
            pending_services: Gauge::default(),
            stranded_services: Gauge::default(),
            metallb: MetallbAllocator::default(),
            registry: Registry::default(),
        };
        for (i, family) in ["", "ipv4_", "ipv6_"].into_iter().enumerate() {
            let which = match family {
                "" => "",
                "ipv4_" => "IPv4 ",
                _ => "IPv6 ",
            };
            root.register(
                format!("metallb_allocator_{family}addresses_in_use_total"),
                format!("Number of {which}IP addresses in use, per pool (MetalLB's name; a gauge)"),
                m.metallb.addresses_in_use[i].clone(),
            );
            root.register(
                format!("metallb_allocator_{family}addresses_total"),
                format!("Number of usable {which}IP addresses, per pool (MetalLB's name; a gauge)"),
                m.metallb.addresses[i].clone(),
            );
        }
        let registry = root.sub_registry_with_prefix("ferrolb_controller");
        registry.register(
            "addresses_in_use",
            "Addresses assigned to Services, per pool and family",
            m.addresses_in_use.clone(),
        );
        registry.register(
            "addresses_capacity",
            "Addresses a pool may hand out (in use or not), per pool and family",
            m.addresses_capacity.clone(),
        );
        registry.register(
            "allocation_failures",
            "Services that could not get an IP, by reason",
            m.allocation_failures.clone(),
        );
        registry.register(
            "reconciles",
            "Batches of changes processed, by what changed",
            m.reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to decide one batch of changes (writes excluded)",
            m.reconcile_duration.clone(),
        );
        registry.register(
            "api_errors",
            "Failed API requests, by resource, verb and kind of error",
            m.api_errors.clone(),
        );
        registry.register(
            "api_writes",
            "Writes made, by kind (service_status, event, pool_status)",
            m.writes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the active controller",
            m.leader.clone(),
        );
        registry.register(
            "pending_services",
            "LoadBalancer Services of ferrolb's without an IP",
            m.pending_services.clone(),
        );
        registry.register(
            "stranded_services",
            "Services keeping IPs that their pool no longer gives out",
            m.stranded_services.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }
}

impl Metrics {
    pub fn set_usage(&self, usage: &[PoolUsage]) {
        self.clear_usage();
        for u in usage {
            let mut sums = [(0, 0); 3];
            for (i, family, used, free) in [
                (1, IpFamily::IPv4, u.assigned.ipv4, u.available.ipv4),
                (2, IpFamily::IPv6, u.assigned.ipv6, u.available.ipv6),
            ] {
                sums[i] = (used, used + free);
                sums[0] = (sums[0].0 + used, sums[0].1 + used + free);
                if used == 0 && free == 0 {
                    continue;
                }
                let labels = PoolLabels {
                    pool: u.name.clone(),
                    family,
                };
                self.addresses_in_use
                    .get_or_create(&labels)
                    .set(used as f64);
                self.addresses_capacity
                    .get_or_create(&labels)
                    .set((used + free) as f64);
            }
            // MetalLB sets all three for every pool, 0 for a family the pool lacks.
            let pool = MetallbPoolLabels {
                pool: u.name.clone(),
            };
            for (i, (used, capacity)) in sums.into_iter().enumerate() {
                self.metallb.addresses_in_use[i]
                    .get_or_create(&pool)
                    .set(used as f64);
                self.metallb.addresses[i]
                    .get_or_create(&pool)
                    .set(capacity as f64);
            }
        }
    }

    fn clear_usage(&self) {
        self.addresses_in_use.clear();
        self.addresses_capacity.clear();
        for f in self
            .metallb
            .addresses_in_use
            .iter()
            .chain(&self.metallb.addresses)
        {
            f.clear();
        }
    }

    /// What only the active replica knows: cleared when it stops being active.
    pub fn clear_active(&self) {
        self.clear_usage();
        self.pending_services.set(0);
        self.stranded_services.set(0);
    }

    pub fn api_error(&self, resource: &str, verb: &str, error: &kube::Error) {
        self.api_errors
            .get_or_create(&ApiErrorLabels {
                resource: resource.to_string(),
                verb: verb.to_string(),
                error: ApiError::from_kube(error).label(),
            })
            .inc();
    }

    /// Counts one `what` in a family with a single label.
    pub fn count<L>(family: &Family<L, Counter>, what: &str)
    where
        L: for<'a> From<&'a str> + Clone + std::hash::Hash + Eq,
    {
        family.get_or_create(&L::from(what)).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_allocator::FamilyCounts;

    fn usage() -> Vec<PoolUsage> {
        vec![PoolUsage {
            name: "office".into(),
            assigned: FamilyCounts { ipv4: 3, ipv6: 0 },
            available: FamilyCounts { ipv4: 7, ipv6: 0 },
        }]
    }

    /// By the Prometheus conventions: a gauge is never named `_total` (MetalLB's
    /// aliases aside, whose names are MetalLB's), a counter always is.
    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::default();
        m.set_usage(&usage());
        Metrics::count(&m.writes, "event");
        Metrics::count(&m.reconciles, "start");
        let text = m.encode();
        let misnamed = ferrolb_kubernetes::http::gauges_named_like_counters(&text);
        assert!(
            misnamed.is_empty(),
            "gauges named like counters: {misnamed:?}"
        );
        for name in [
            "ferrolb_controller_api_writes_total{kind=\"event\"} 1",
            "ferrolb_controller_reconciles_total{trigger=\"start\"} 1",
            "ferrolb_controller_addresses_in_use{pool=\"office\",family=\"IPv4\"} 3",
            "ferrolb_controller_addresses_capacity{pool=\"office\",family=\"IPv4\"} 10",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
        assert!(
            !text.contains("ferrolb_controller_addresses_total"),
            "{text}"
        );
    }

    #[test]
    fn metallb_allocator_aliases_carry_metallbs_names_and_labels() {
        let m = Metrics::default();
        m.set_usage(&usage());
        let text = m.encode();
        for sample in [
            "metallb_allocator_addresses_in_use_total{pool=\"office\"} 3",
            "metallb_allocator_addresses_total{pool=\"office\"} 10",
            "metallb_allocator_ipv4_addresses_in_use_total{pool=\"office\"} 3",
            "metallb_allocator_ipv4_addresses_total{pool=\"office\"} 10",
            "metallb_allocator_ipv6_addresses_in_use_total{pool=\"office\"} 0",
            "metallb_allocator_ipv6_addresses_total{pool=\"office\"} 0",
            "# TYPE metallb_allocator_addresses_total gauge",
        ] {
            assert!(text.contains(sample), "{sample} missing from\n{text}");
        }
        // Only the active replica knows: a replica standing by says nothing.
        m.clear_active();
        assert!(!m.encode().contains("pool=\"office\""));
    }
}
