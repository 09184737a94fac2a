//! The controller's Prometheus metrics.

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiErrorLabels {
    pub resource: String,
    pub verb: String,
    /// [`ApiError::label`]: not_found, conflict, forbidden, gone, invalid, transient.
    pub error: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub addresses_in_use: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub addresses_total: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pub allocation_failures: Family<ReasonLabels, Counter>,
    pub reconciles: Family<TriggerLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub api_errors: Family<ApiErrorLabels, Counter>,
    pub writes: Family<TriggerLabels, Counter>,
    pub leader: Gauge,
    pub pending_services: Gauge,
    pub stranded_services: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferrolb_controller");
        let m = Metrics {
            addresses_in_use: Family::default(),
            addresses_total: Family::default(),
            allocation_failures: Family::default(),
            reconciles: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            api_errors: Family::default(),
            writes: Family::default(),
            leader: Gauge::default(),
            pending_services: Gauge::default(),
            stranded_services: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "addresses_in_use",
            "Addresses assigned to Services, per pool and family",
            m.addresses_in_use.clone(),
        );
        registry.register(
            "addresses_total",
            "Addresses a pool may hand out (in use or not), per family",
            m.addresses_total.clone(),
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
            "Failed API requests, by resource, verb and HTTP code",
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
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn set_usage(&self, usage: &[PoolUsage]) {
        self.addresses_in_use.clear();
        self.addresses_total.clear();
        for u in usage {
            for (family, used, free) in [
                (IpFamily::IPv4, u.assigned.ipv4, u.available.ipv4),
                (IpFamily::IPv6, u.assigned.ipv6, u.available.ipv6),
            ] {
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
                self.addresses_total
                    .get_or_create(&labels)
                    .set((used + free) as f64);
            }
        }
    }

    /// What only the active replica knows: cleared when it stops being active.
    pub fn clear_active(&self) {
        self.addresses_in_use.clear();
        self.addresses_total.clear();
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

    pub fn count(family: &Family<TriggerLabels, Counter>, what: &str) {
        family
            .get_or_create(&TriggerLabels {
                trigger: what.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
