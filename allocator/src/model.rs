//! The allocator's vocabulary: what it is told about Services and pools, and what it
//! answers. Plain data, public at the crate root.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ferrolb_api::selector::Labels;
use ferrolb_api::{AddressRange, Family};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// `namespace/name` of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> ServiceKey {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A Service port as far as sharing is concerned: two Services on one IP must not both
/// use the same port and protocol.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortKey {
    pub port: i32,
    pub protocol: String,
}

impl fmt::Display for PortKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FamilyPolicy {
    #[default]
    SingleStack,
    PreferDualStack,
    RequireDualStack,
}

/// `spec.externalTrafficPolicy`, with what sharing needs to know about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Traffic {
    #[default]
    Cluster,
    /// Traffic stays on nodes with a local endpoint, so Services sharing an IP must
    /// select the same pods or one of them would be unreachable from the owner node.
    Local { selector: Labels },
}

/// Everything the allocator needs to know about one LoadBalancer Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRequest {
    pub key: ServiceKey,
    pub labels: Labels,
    pub ports: Vec<PortKey>,
    pub sharing_key: Option<String>,
    /// IPs asked for by annotation or `spec.loadBalancerIP`, at most one per family.
    pub requested: Vec<IpAddr>,
    /// The one pool the Service may use (`ferrolb.io/address-pool`).
    pub pool: Option<String>,
    pub family_policy: FamilyPolicy,
    /// Families in order of preference; never empty.
    pub families: Vec<Family>,
    pub traffic: Traffic,
    /// IPs the Service holds now (from `status.loadBalancer.ingress`).
    pub current: Vec<IpAddr>,
}

impl Default for ServiceKey {
    fn default() -> Self {
        ServiceKey::new("default", "")
    }
}

/// One pool as the allocator sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub ranges: Vec<AddressRange>,
    /// False when the pool is Invalid or Overlapping: it hands out nothing new, but
    /// Services already holding one of its addresses keep them.
    pub usable: bool,
    /// Why the pool is not usable, for messages.
    pub problem: Option<String>,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    /// Services of different namespaces may share an IP of this pool.
    pub share_across_namespaces: bool,
    pub priority: Option<i32>,
    pub namespaces: Vec<String>,
    pub namespace_selectors: Vec<LabelSelector>,
    pub service_selectors: Vec<LabelSelector>,
}

/// Where the search for a new address starts in a pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Start {
    /// The lowest free address, as MetalLB and Cilium do. For the cluster controller,
    /// whose answers status remembers.
    #[default]
    Lowest,
    /// A point of the pool hashed from the Service's namespace and name (or its sharing
    /// key). For standalone speakers, which recompute from files with no memory: removing
    /// one Service then moves no other.
    Hashed,
}

/// One IP given to a Service, and the pool it came from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Assignment {
    pub ip: IpAddr,
    /// Empty for a stranded IP that lies in no pool any more.
    pub pool: String,
}

/// What a Service gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `notes` explains a family that PreferDualStack could not get.
    Assigned {
        assignments: Vec<Assignment>,
        notes: Vec<String>,
    },
    /// The Service keeps IPs that a pool change made invalid for it (in no pool, or in
    /// a pool no longer open to it). They stay occupied, so nobody else gets them, until
    /// the Service's own request rules them out or it is deleted; `reason` says which IP
    /// and why, for a warning. `assignments` holds every IP, valid or not.
    Stranded {
        assignments: Vec<Assignment>,
        reason: String,
        notes: Vec<String>,
    },
    /// No IP; `reason` is a sentence a person can act on, `kind` what sort of failure it
    /// is, for metrics and advice.
    Pending { reason: String, kind: Shortfall },
}

/// Why a Service gets no IP. When several families fail for different reasons the
/// greatest (in this order) stands for all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Shortfall {
    /// Anything else: an IP held or requested cannot be shared, say.
    Other,
    /// RequireDualStack, and a family cannot be served.
    DualStack,
    /// No pool is open to the Service for a family, or the pool it names does not exist.
    NoPool,
    /// The IP it requests cannot be given.
    RequestedUnavailable,
    /// The pools open to it are full.
    Exhausted,
}

impl Shortfall {
    /// The label of the allocation-failure metric.
    pub fn label(self) -> &'static str {
        match self {
            Shortfall::Other => "other",
            Shortfall::DualStack => "dual_stack",
            Shortfall::NoPool => "no_pool",
            Shortfall::RequestedUnavailable => "requested_unavailable",
            Shortfall::Exhausted => "exhausted",
        }
    }
}

impl Outcome {
    pub fn assignments(&self) -> &[Assignment] {
        match self {
            Outcome::Assigned { assignments, .. } | Outcome::Stranded { assignments, .. } => {
                assignments
            }
            Outcome::Pending { .. } => &[],
        }
    }
}

/// Addresses per family. IPv6 counts exceed 2^64, hence u128.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilyCounts {
    pub ipv4: u128,
    pub ipv6: u128,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    pub assigned: FamilyCounts,
    pub available: FamilyCounts,
}

/// The answer of [`plan`](crate::plan).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub services: BTreeMap<ServiceKey, Outcome>,
    pub pools: Vec<PoolUsage>,
}
