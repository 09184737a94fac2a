//! IP address management: which external IPs each LoadBalancer Service gets, and
//! ([`input`]) the translation of Kubernetes objects into the allocator's input.
//!
//! Pure: plain data in, plain data out; no kube, no tokio, no I/O. The controller keeps
//! one [`Allocator`]: at start (and after a pool or namespace change) it builds a new one
//! and calls [`Allocator::allocate_all`] on every Service as stored, then
//! [`Allocator::assign`] / [`Allocator::release`] as single Services change. `ferrolb plan`
//! and the speaker's standalone mode call [`plan`], which is `allocate_all` on a fresh
//! allocator: the same input gives the same answer on every machine, in any input order.
//!
//! The rules, in order of precedence:
//! 1. A Service keeps the IPs it already has (in its status) unless its own request
//!    rules them out (another requested IP or pool, a family it no longer lists) or
//!    they can no longer be shared with their other holders. An IP that a pool edit left
//!    outside every pool open to the Service is kept too, but reported as
//!    [`Outcome::Stranded`]: moving a working Service is the user's call, not ours.
//! 2. Requested IPs are honoured when valid and free or shareable; otherwise the
//!    Service is pending with the reason.
//! 3. Otherwise each wanted family gets an IP from the first eligible pool (by
//!    `serviceAllocation.priority`, pools dedicated to the Service before open ones,
//!    then name): an IP already shared under the Service's `allow-shared-ip` key if one
//!    fits, else the first free address from the [`Start`] point, wrapping around.
//!
//! Two starting points, because the two callers remember differently: the controller
//! writes every answer to status, so [`Start::Lowest`] (MetalLB's and Cilium's rule,
//! what users expect) is stable there. Standalone speakers recompute from files with no
//! memory; with lowest-first, deleting one Service would shift every later one, so they
//! use [`Start::Hashed`], a point per Service from which deleting or adding a Service
//! moves no other.
//!
//! Where the rules live: `model` holds what goes in and comes out (re-exported here),
//! `allocate` the policy above, `pools` which pool may serve which Service and how full
//! each is, `sharing` who holds each IP and who may join them, `free` the free addresses.

mod allocate;
mod free;
pub mod input;
mod model;
mod pools;
mod sharing;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ferrolb_api::selector::Labels;

pub use model::{
    Assignment, FamilyCounts, FamilyPolicy, Outcome, Plan, PoolConfig, PoolUsage, PortKey,
    ServiceKey, ServiceRequest, Shortfall, Start, Traffic,
};
use pools::PoolState;
use sharing::Holders;

/// The allocator's state: pools, and who holds which IP.
#[derive(Clone)]
pub struct Allocator {
    /// Sorted by name.
    pools: Vec<PoolState>,
    namespaces: BTreeMap<String, Labels>,
    start: Start,
    holders: HashMap<IpAddr, Holders>,
    by_service: HashMap<ServiceKey, Vec<Assignment>>,
    /// IPs held under each sharing key, ordered so that joining one is deterministic.
    by_sharing_key: HashMap<String, BTreeSet<IpAddr>>,
}

impl Allocator {
    /// `namespaces` maps namespace names to their labels; a namespace missing from it
    /// has only the `kubernetes.io/metadata.name` label Kubernetes gives every one.
    pub fn new(
        mut pools: Vec<PoolConfig>,
        namespaces: BTreeMap<String, Labels>,
        start: Start,
    ) -> Allocator {
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        Allocator {
            pools: pools.into_iter().map(PoolState::new).collect(),
            namespaces,
            start,
            holders: HashMap::new(),
            by_service: HashMap::new(),
            by_sharing_key: HashMap::new(),
        }
    }

    /// What a Service holds now.
    pub fn assignments(&self, key: &ServiceKey) -> &[Assignment] {
        self.by_service
            .get(key)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

/// Allocates for a whole set of Services at once, deterministically: the same pools,
/// namespaces and Services, in any order, give the same answer. It is
/// [`Allocator::allocate_all`] on a new allocator.
pub fn plan(
    pools: Vec<PoolConfig>,
    namespaces: BTreeMap<String, Labels>,
    services: &[ServiceRequest],
    start: Start,
) -> Plan {
    let mut allocator = Allocator::new(pools, namespaces, start);
    let services = allocator.allocate_all(services);
    Plan {
        services,
        pools: allocator.usage(),
    }
}

#[cfg(test)]
mod tests;
