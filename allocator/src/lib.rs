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

mod free;
pub mod input;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::IpAddr;

use ferrolb_api::address::{buggy_count, from_u128, is_buggy, to_u128};
use ferrolb_api::hash::stable_hash128;
use ferrolb_api::selector::{self, Labels};
use ferrolb_api::{AddressRange, Family};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use free::FreeSpace;

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
    /// No IP; `reason` is a sentence a person can act on.
    Pending { reason: String },
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

/// The answer of [`plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub services: BTreeMap<ServiceKey, Outcome>,
    pub pools: Vec<PoolUsage>,
}

#[derive(Clone)]
struct PoolState {
    config: PoolConfig,
    /// The pool's addresses as disjoint sorted spans, indexed by [`slot`].
    spans: [Vec<(u128, u128)>; 2],
    /// Indexed by [`slot`].
    free: [FreeSpace; 2],
    /// Addresses that may be handed out (`.0`/`.255` excluded under avoidBuggyIPs).
    total: [u128; 2],
    assigned: [u128; 2],
}

fn slot(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl PoolState {
    fn new(config: PoolConfig) -> PoolState {
        let mut free = [FreeSpace::default(), FreeSpace::default()];
        let mut spans = [Vec::new(), Vec::new()];
        let mut total = [0u128; 2];
        for family in [Family::V4, Family::V6] {
            let ranges: Vec<(u128, u128)> = config
                .ranges
                .iter()
                .filter(|r| r.family() == family)
                .map(|r| (r.first(), r.last()))
                .collect();
            let space = FreeSpace::new(ranges);
            total[slot(family)] = space
                .intervals()
                .map(|(s, e)| {
                    let buggy = if config.avoid_buggy_ips {
                        buggy_count(family, s, e)
                    } else {
                        0
                    };
                    (e - s + 1) - buggy
                })
                .fold(0u128, u128::saturating_add);
            spans[slot(family)] = space.intervals().collect();
            free[slot(family)] = space;
        }
        PoolState {
            config,
            spans,
            free,
            total,
            assigned: [0; 2],
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.config.ranges.iter().any(|r| r.contains(ip))
    }

    fn has_family(&self, family: Family) -> bool {
        self.config.ranges.iter().any(|r| r.family() == family)
    }

    /// Where a search for a free address starts: the address at `position` (modulo the
    /// pool's size) counting through the pool's spans in order.
    fn start(&self, family: Family, position: u128) -> Option<u128> {
        let spans = &self.spans[slot(family)];
        let size = spans
            .iter()
            .map(|(s, e)| e - s + 1)
            .fold(0u128, u128::saturating_add);
        if size == 0 {
            return None;
        }
        let mut offset = position % size;
        for (s, e) in spans {
            let len = e - s + 1;
            if offset < len {
                return Some(s + offset);
            }
            offset -= len;
        }
        None
    }
}

/// A Service's position in every pool: from its sharing key when it has one (so Services
/// meant to share start at the same address), else from its namespace and name.
fn position(svc: &ServiceRequest) -> u128 {
    match &svc.sharing_key {
        Some(key) => stable_hash128(&[b"allow-shared-ip", key.as_bytes()]),
        None => stable_hash128(&[svc.key.namespace.as_bytes(), svc.key.name.as_bytes()]),
    }
}

/// The Services holding one IP, sorted by key. Nearly always one, so a vector, not a
/// tree: at 10,000 IPs a tree node per IP would cost more than everything else.
#[derive(Clone, Debug, Default)]
struct Holders(Vec<(ServiceKey, Holder)>);

impl Holders {
    fn iter(&self) -> impl Iterator<Item = (&ServiceKey, &Holder)> {
        self.0.iter().map(|(k, h)| (k, h))
    }

    fn values(&self) -> impl Iterator<Item = &Holder> {
        self.0.iter().map(|(_, h)| h)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn insert(&mut self, key: ServiceKey, holder: Holder) {
        match self.0.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(i) => self.0[i].1 = holder,
            Err(i) => self.0.insert(i, (key, holder)),
        }
    }

    fn remove(&mut self, key: &ServiceKey) -> Option<Holder> {
        let i = self.0.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
        Some(self.0.remove(i).1)
    }
}

/// What a holder of an IP brings to the sharing rules.
#[derive(Clone, Debug)]
struct Holder {
    ports: Vec<PortKey>,
    sharing_key: Option<String>,
    traffic: Traffic,
}

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

/// Whether a Service may go on holding an IP, as far as pools are concerned.
enum Standing {
    /// In a pool open to it (or in an unusable pool, which keeps its holders).
    Valid(usize),
    /// Kept, but no longer valid: the pool, if any, and why.
    Stranded(Option<usize>, String),
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

    /// Per-pool counts, sorted by pool name.
    pub fn usage(&self) -> Vec<PoolUsage> {
        self.pools
            .iter()
            .map(|p| {
                // An unusable pool hands nothing out, whatever it holds.
                let available = |i: usize| {
                    if p.config.usable {
                        p.total[i].saturating_sub(p.assigned[i])
                    } else {
                        0
                    }
                };
                PoolUsage {
                    name: p.config.name.clone(),
                    assigned: FamilyCounts {
                        ipv4: p.assigned[0],
                        ipv6: p.assigned[1],
                    },
                    available: FamilyCounts {
                        ipv4: available(0),
                        ipv6: available(1),
                    },
                }
            })
            .collect()
    }

    /// Decides every Service at once, as [`plan`] does: [`Allocator::adopt`] first, then
    /// [`Allocator::assign`] for each, those requesting IPs first, then by
    /// namespace/name. The controller calls this on a new allocator once its watches have
    /// synced, then `assign`/`release` as Services change.
    ///
    /// A Service that held IPs but ends pending (RequireDualStack short of a family)
    /// blocked them while others were decided, so the whole set is decided again as if
    /// its status were empty: the answer is then also what a second run on it gives.
    pub fn allocate_all(&mut self, services: &[ServiceRequest]) -> BTreeMap<ServiceKey, Outcome> {
        let initial = self.clone();
        let mut services: Cow<[ServiceRequest]> = Cow::Borrowed(services);
        loop {
            let mut order = sorted(&services);
            self.adopt_sorted(&order);
            let adopted: BTreeSet<ServiceKey> = order
                .iter()
                .filter(|svc| !self.assignments(&svc.key).is_empty())
                .map(|svc| svc.key.clone())
                .collect();
            order.sort_by(|a, b| {
                (a.requested.is_empty(), &a.key).cmp(&(b.requested.is_empty(), &b.key))
            });
            let outcomes: BTreeMap<ServiceKey, Outcome> = order
                .into_iter()
                .map(|svc| (svc.key.clone(), self.assign(svc)))
                .collect();
            let blocked: BTreeSet<&ServiceKey> = adopted
                .iter()
                .filter(|key| matches!(outcomes[*key], Outcome::Pending { .. }))
                .collect();
            if blocked.is_empty() {
                return outcomes;
            }
            // Each round empties the status of at least one Service, so this ends.
            services = Cow::Owned(
                services
                    .iter()
                    .map(|svc| {
                        let mut svc = svc.clone();
                        if blocked.contains(&svc.key) {
                            svc.current.clear();
                        }
                        svc
                    })
                    .collect(),
            );
            *self = initial.clone();
        }
    }

    /// Takes the IPs the Services already hold (`current`, from status) without deciding
    /// anything new, so that no new pick can take them: what the controller must do
    /// before it allocates anything. Keeps an IP unless the Service's own request rules it
    /// out or it cannot be shared with its other holders; IPs a pool change made invalid
    /// are kept too (see [`Outcome::Stranded`]). Services that already hold IPs here are
    /// left as they are.
    ///
    /// When several Services claim one IP they may not all share, the largest group that
    /// may share it keeps it (ties: the group of the first Service by namespace/name), so
    /// that editing one sharer moves only that one. Give every Service in one call for an
    /// answer independent of order. Returns what each Service now holds.
    pub fn adopt(&mut self, services: &[ServiceRequest]) -> BTreeMap<ServiceKey, Vec<Assignment>> {
        let order = sorted(services);
        self.adopt_sorted(&order);
        order
            .iter()
            .map(|svc| (svc.key.clone(), self.assignments(&svc.key).to_vec()))
            .collect()
    }

    /// `services` sorted by key, without duplicates.
    fn adopt_sorted(&mut self, services: &[&ServiceRequest]) {
        let mut claims: BTreeMap<IpAddr, Vec<&ServiceRequest>> = BTreeMap::new();
        for svc in services {
            if self.by_service.contains_key(&svc.key) {
                continue;
            }
            let Ok(families) = wanted_families(svc) else {
                continue;
            };
            for family in families {
                if let Some(ip) = self.current_claim(svc, family) {
                    claims.entry(ip).or_default().push(svc);
                }
            }
        }
        for (ip, claimants) in claims {
            for svc in self.sharers(ip, claimants) {
                if self.sharing_refusal(ip, svc).is_none() {
                    let pool = match self.standing(svc, ip) {
                        Standing::Valid(pool) => Some(pool),
                        Standing::Stranded(pool, _) => pool,
                    };
                    self.occupy(ip, pool, svc);
                }
            }
        }
    }

    /// Among the claimants of one IP (sorted by key), those that keep it, in the order to
    /// admit them: the largest class that may share with the IP's present holders and
    /// with each other (same key and traffic policy), the Services whose ports clash with
    /// the fewest others first.
    fn sharers<'s>(
        &self,
        ip: IpAddr,
        claimants: Vec<&'s ServiceRequest>,
    ) -> Vec<&'s ServiceRequest> {
        let mut classes: Vec<Vec<&ServiceRequest>> = Vec::new();
        for svc in claimants {
            if self.sharing_refusal(ip, svc).is_some() {
                continue;
            }
            let class = classes.iter_mut().find(|c| {
                svc.sharing_key.is_some()
                    && c[0].sharing_key == svc.sharing_key
                    && c[0].traffic == svc.traffic
            });
            match class {
                Some(c) => c.push(svc),
                None => classes.push(vec![svc]),
            }
        }
        let mut best: Vec<&ServiceRequest> = Vec::new();
        for class in classes {
            if class.len() > best.len() {
                best = class;
            }
        }
        let clashes = |svc: &ServiceRequest| {
            best.iter()
                .filter(|o| o.key != svc.key && o.ports.iter().any(|p| svc.ports.contains(p)))
                .count()
        };
        let mut ranked: Vec<(usize, &ServiceRequest)> =
            best.iter().map(|svc| (clashes(svc), *svc)).collect();
        ranked.sort_by(|a, b| (a.0, &a.1.key).cmp(&(b.0, &b.1.key)));
        ranked.into_iter().map(|(_, svc)| svc).collect()
    }

    /// Frees every IP the Service holds (deleted, or no longer a LoadBalancer).
    pub fn release(&mut self, key: &ServiceKey) {
        for a in self.by_service.remove(key).unwrap_or_default() {
            self.vacate(a.ip, key);
        }
    }

    /// Decides the Service's IPs, keeping current ones it may keep, and records them.
    pub fn assign(&mut self, svc: &ServiceRequest) -> Outcome {
        self.release(&svc.key);
        let families = match wanted_families(svc) {
            Ok(f) => f,
            Err(reason) => return Outcome::Pending { reason },
        };
        if let Some(ip) = svc
            .requested
            .iter()
            .find(|ip| !families.contains(&Family::of(**ip)))
        {
            let allowed: Vec<&str> = families.iter().map(|f| f.as_kubernetes()).collect();
            return Outcome::Pending {
                reason: format!(
                    "requested {ip} is {} but the Service's ipFamilies allow only {}",
                    Family::of(*ip),
                    allowed.join(", ")
                ),
            };
        }
        let mut problems = Vec::new();
        let mut stranded = Vec::new();
        for family in &families {
            let requested = svc.requested.iter().find(|ip| Family::of(**ip) == *family);
            let current = self.current_claim(svc, *family);
            let chosen = match (requested, current) {
                // Asked for and held: kept like any held IP, even if a pool change
                // stranded it.
                (Some(r), Some(c)) if *r == c => {
                    self.keep(svc, c).map_err(|e| format!("requested {e}"))
                }
                (Some(r), _) => self
                    .check_ip(svc, *r)
                    .map(|pool| (*r, Some(pool), None))
                    .map_err(|e| format!("requested {e}")),
                (None, Some(c)) => self.keep(svc, c).or_else(|_| self.pick(svc, *family)),
                (None, None) => self.pick(svc, *family),
            };
            match chosen {
                Ok((ip, pool, why)) => {
                    self.occupy(ip, pool, svc);
                    stranded.extend(why);
                }
                Err(reason) => problems.push(reason),
            }
        }
        let got = self.assignments(&svc.key).to_vec();
        if problems.is_empty()
            || (svc.family_policy == FamilyPolicy::PreferDualStack && !got.is_empty())
        {
            return if stranded.is_empty() {
                Outcome::Assigned {
                    assignments: got,
                    notes: problems,
                }
            } else {
                Outcome::Stranded {
                    assignments: got,
                    reason: stranded.join("; "),
                    notes: problems,
                }
            };
        }
        self.release(&svc.key);
        let prefix = if svc.family_policy == FamilyPolicy::RequireDualStack
            && problems.len() < families.len()
        {
            "RequireDualStack needs both families: "
        } else {
            ""
        };
        Outcome::Pending {
            reason: format!("{prefix}{}", problems.join("; ")),
        }
    }

    /// Whether the Service may go on holding `ip`: an error (reading after "requested ")
    /// when it cannot share it with its holders; else the pool and, for a stranded IP,
    /// why it is no longer valid.
    fn keep(
        &self,
        svc: &ServiceRequest,
        ip: IpAddr,
    ) -> Result<(IpAddr, Option<usize>, Option<String>), String> {
        if let Some(why) = self.sharing_refusal(ip, svc) {
            return Err(why);
        }
        Ok(match self.standing(svc, ip) {
            Standing::Valid(pool) => (ip, Some(pool), None),
            Standing::Stranded(pool, why) => (
                ip,
                pool,
                Some(format!(
                    "{why}; the Service keeps it until it asks for another IP or pool, or is deleted"
                )),
            ),
        })
    }

    /// Whether a held IP is still valid for the Service, pools-wise.
    fn standing(&self, svc: &ServiceRequest, ip: IpAddr) -> Standing {
        let Some(pool) = self.pool_of(ip, svc) else {
            return Standing::Stranded(None, format!("{ip} is in no IPAddressPool"));
        };
        let p = &self.pools[pool];
        let name = &p.config.name;
        if let Some(why) = self.refusal(pool, svc) {
            return Standing::Stranded(Some(pool), format!("{ip} is in pool {name:?}, but {why}"));
        }
        if p.config.avoid_buggy_ips && is_buggy(Family::of(ip), to_u128(ip)) {
            return Standing::Stranded(
                Some(pool),
                format!("{ip} ends in .0 or .255 and pool {name:?} sets avoidBuggyIPs"),
            );
        }
        Standing::Valid(pool)
    }

    /// The pool an IP belongs to: the one the Service names if it holds the IP, else a
    /// usable one if any holds it.
    fn pool_of(&self, ip: IpAddr, svc: &ServiceRequest) -> Option<usize> {
        let containing: Vec<usize> = (0..self.pools.len())
            .filter(|&i| self.pools[i].contains(ip))
            .collect();
        containing
            .iter()
            .find(|&&i| svc.pool.as_deref() == Some(self.pools[i].config.name.as_str()))
            .or_else(|| containing.iter().find(|&&i| self.pools[i].config.usable))
            .or(containing.first())
            .copied()
    }

    /// Whether the Service may be given `ip`, which it asked for; the error reads after
    /// "requested ".
    fn check_ip(&self, svc: &ServiceRequest, ip: IpAddr) -> Result<usize, String> {
        let Some(pool) = self.pool_of(ip, svc) else {
            return Err(format!("{ip} is in no pool"));
        };
        let p = &self.pools[pool];
        let name = &p.config.name;
        if !p.config.usable {
            let why = p.config.problem.as_deref().unwrap_or("it is not ready");
            return Err(format!(
                "{ip} is in pool {name:?}, which is not usable: {why}"
            ));
        }
        if let Some(why) = self.refusal(pool, svc) {
            return Err(format!("{ip} is in pool {name:?}, but {why}"));
        }
        if p.config.avoid_buggy_ips && is_buggy(Family::of(ip), to_u128(ip)) {
            return Err(format!(
                "{ip} ends in .0 or .255 and pool {name:?} sets avoidBuggyIPs"
            ));
        }
        match self.sharing_refusal(ip, svc) {
            Some(why) => Err(why),
            None => Ok(pool),
        }
    }

    /// The IP of `family` the Service holds and may go on holding as far as its own
    /// request goes: not one it replaced by requesting another IP of that family, nor one
    /// outside the pool it names (the user asked for something else).
    fn current_claim(&self, svc: &ServiceRequest, family: Family) -> Option<IpAddr> {
        svc.current
            .iter()
            .copied()
            .filter(|ip| Family::of(*ip) == family)
            .find(|ip| {
                svc.requested
                    .iter()
                    .all(|r| Family::of(*r) != family || r == ip)
                    && svc.pool.as_ref().is_none_or(|name| {
                        self.pools
                            .iter()
                            .any(|p| p.config.name == *name && p.contains(*ip))
                    })
            })
    }

    /// Why a pool does not serve this Service, if it does not (autoAssign and
    /// usability aside).
    fn refusal(&self, pool: usize, svc: &ServiceRequest) -> Option<String> {
        let c = &self.pools[pool].config;
        if let Some(wanted) = &svc.pool
            && *wanted != c.name
        {
            return Some(format!("the Service asks for pool {wanted:?}"));
        }
        let ns = &svc.key.namespace;
        let ns_open = (c.namespaces.is_empty() && c.namespace_selectors.is_empty())
            || c.namespaces.contains(ns)
            || selector::any_matches(&c.namespace_selectors, &self.namespace_labels(ns));
        if !ns_open {
            return Some(format!(
                "pool {:?} does not serve namespace {ns:?} (spec.serviceAllocation)",
                c.name
            ));
        }
        if !c.service_selectors.is_empty()
            && !selector::any_matches(&c.service_selectors, &svc.labels)
        {
            return Some(format!(
                "pool {:?} serves only Services matching spec.serviceAllocation.serviceSelectors",
                c.name
            ));
        }
        None
    }

    fn namespace_labels(&self, ns: &str) -> Labels {
        self.namespaces
            .get(ns)
            .cloned()
            .unwrap_or_else(|| [("kubernetes.io/metadata.name".to_string(), ns.to_string())].into())
    }

    /// Why the Service may not join the current holders of `ip`, if it may not.
    fn sharing_refusal(&self, ip: IpAddr, svc: &ServiceRequest) -> Option<String> {
        let holders = self.holders.get(&ip)?;
        for (other, h) in holders.iter().filter(|(k, _)| **k != svc.key) {
            let key = match (&svc.sharing_key, &h.sharing_key) {
                (None, _) => {
                    return Some(format!(
                        "{ip} is used by {other}, and this Service has no allow-shared-ip key"
                    ));
                }
                (Some(_), None) => {
                    return Some(format!(
                        "{ip} is used by {other}, which has no allow-shared-ip key"
                    ));
                }
                (Some(mine), Some(theirs)) if mine != theirs => {
                    return Some(format!(
                        "{ip} is used by {other} with allow-shared-ip key {theirs:?}, not {mine:?}"
                    ));
                }
                (Some(mine), Some(_)) => mine,
            };
            let clash: Vec<String> = svc
                .ports
                .iter()
                .filter(|p| h.ports.contains(p))
                .map(|p| p.to_string())
                .collect();
            if !clash.is_empty() {
                return Some(format!(
                    "{ip}: ports {} clash with {other} on shared key {key:?}",
                    clash.join(", ")
                ));
            }
            if svc.traffic != h.traffic {
                return Some(format!(
                    "{ip} is used by {other}; Services with externalTrafficPolicy Local share an IP \
                     only with Local Services selecting the same pods"
                ));
            }
        }
        None
    }

    /// A new IP of `family` for the Service (shaped like [`Allocator::keep`]'s answer).
    fn pick(
        &self,
        svc: &ServiceRequest,
        family: Family,
    ) -> Result<(IpAddr, Option<usize>, Option<String>), String> {
        if let Some(wanted) = &svc.pool
            && !self.pools.iter().any(|p| p.config.name == *wanted)
        {
            return Err(format!(
                "pool {wanted:?} (annotation ferrolb.io/address-pool) does not exist"
            ));
        }
        let mut candidates: Vec<usize> = (0..self.pools.len())
            .filter(|&i| {
                let p = &self.pools[i];
                p.config.usable
                    && p.has_family(family)
                    && (p.config.auto_assign || svc.pool.is_some())
                    && self.refusal(i, svc).is_none()
            })
            .collect();
        if candidates.is_empty() {
            return Err(self.explain_no_pool(svc, family));
        }
        // Among equal priorities, a pool whose serviceAllocation singles the Service out
        // (it passed the filter above) is what an admin dedicated to it: before open ones.
        candidates.sort_by_key(|&i| {
            let c = &self.pools[i].config;
            let open = c.namespaces.is_empty()
                && c.namespace_selectors.is_empty()
                && c.service_selectors.is_empty();
            (c.priority.is_none(), c.priority, open, i)
        });
        if let Some(key) = &svc.sharing_key {
            for ip in self.by_sharing_key.get(key).into_iter().flatten() {
                if Family::of(*ip) == family
                    && let Some(pool) = self.pool_of(*ip, svc)
                    && candidates.contains(&pool)
                    && self.sharing_refusal(*ip, svc).is_none()
                {
                    return Ok((*ip, Some(pool), None));
                }
            }
        }
        let position = match self.start {
            Start::Lowest => 0,
            Start::Hashed => position(svc),
        };
        for &i in &candidates {
            let p = &self.pools[i];
            if let Some(start) = p.start(family, position)
                && let Some(n) =
                    p.free[slot(family)].first_from(start, family, p.config.avoid_buggy_ips)
            {
                return Ok((from_u128(family, n), Some(i), None));
            }
        }
        let names: Vec<String> = candidates
            .iter()
            .map(|&i| format!("{:?}", self.pools[i].config.name))
            .collect();
        Err(if names.len() == 1 {
            format!("pool {} is exhausted", names[0])
        } else {
            format!("pools {} are exhausted", names.join(", "))
        })
    }

    fn explain_no_pool(&self, svc: &ServiceRequest, family: Family) -> String {
        if self.pools.is_empty() {
            return "no IPAddressPool exists".to_string();
        }
        if let Some(wanted) = &svc.pool
            && let Some(p) = self.pools.iter().find(|p| p.config.name == *wanted)
            && p.config.usable
            && !p.has_family(family)
        {
            return format!("pool {wanted:?} has no {family} addresses");
        }
        let reasons: Vec<String> = self
            .pools
            .iter()
            .enumerate()
            // A broken pool may have no parseable range of this family, yet be the one
            // the user meant.
            .filter(|(_, p)| p.has_family(family) || !p.config.usable)
            .filter(|(_, p)| svc.pool.as_ref().is_none_or(|want| *want == p.config.name))
            .map(|(i, p)| {
                let name = &p.config.name;
                if !p.config.usable {
                    format!(
                        "pool {name:?} is not usable ({})",
                        p.config.problem.as_deref().unwrap_or("not ready")
                    )
                } else if let Some(why) = self.refusal(i, svc) {
                    why
                } else {
                    format!("pool {name:?} has autoAssign false")
                }
            })
            .collect();
        if reasons.is_empty() {
            return format!("no pool has {family} addresses");
        }
        let mut reasons = reasons;
        reasons.dedup();
        format!(
            "no {family} pool is open to this Service: {}",
            reasons.join("; ")
        )
    }

    fn occupy(&mut self, ip: IpAddr, pool: Option<usize>, svc: &ServiceRequest) {
        let holders = self.holders.entry(ip).or_default();
        if holders.is_empty() {
            let family = Family::of(ip);
            for p in self.pools.iter_mut().filter(|p| p.contains(ip)) {
                if p.free[slot(family)].take(to_u128(ip)) {
                    p.assigned[slot(family)] += 1;
                }
            }
        }
        holders.insert(
            svc.key.clone(),
            Holder {
                ports: svc.ports.clone(),
                sharing_key: svc.sharing_key.clone(),
                traffic: svc.traffic.clone(),
            },
        );
        if let Some(key) = &svc.sharing_key {
            self.by_sharing_key
                .entry(key.clone())
                .or_default()
                .insert(ip);
        }
        let held = self.by_service.entry(svc.key.clone()).or_default();
        held.push(Assignment {
            ip,
            pool: pool
                .map(|i| self.pools[i].config.name.clone())
                .unwrap_or_default(),
        });
        held.sort();
    }

    fn vacate(&mut self, ip: IpAddr, key: &ServiceKey) {
        let Some(holders) = self.holders.get_mut(&ip) else {
            return;
        };
        let Some(gone) = holders.remove(key) else {
            return;
        };
        if let Some(sharing) = &gone.sharing_key
            && !holders
                .values()
                .any(|h| h.sharing_key.as_ref() == Some(sharing))
            && let Some(set) = self.by_sharing_key.get_mut(sharing)
        {
            set.remove(&ip);
            if set.is_empty() {
                self.by_sharing_key.remove(sharing);
            }
        }
        if holders.is_empty() {
            self.holders.remove(&ip);
            let family = Family::of(ip);
            for p in self.pools.iter_mut().filter(|p| p.contains(ip)) {
                p.free[slot(family)].give_back(to_u128(ip));
                p.assigned[slot(family)] -= 1;
            }
        }
    }
}

/// The families a Service gets IPs for, in order: those of `spec.ipFamilies` (what the
/// API server filled from the cluster's families), one for SingleStack.
fn wanted_families(svc: &ServiceRequest) -> Result<Vec<Family>, String> {
    let mut families = svc.families.clone();
    if families.is_empty() {
        families.push(Family::V4);
    }
    families.dedup();
    families.truncate(2);
    match svc.family_policy {
        FamilyPolicy::SingleStack => families.truncate(1),
        FamilyPolicy::PreferDualStack => {}
        FamilyPolicy::RequireDualStack if families.len() < 2 => {
            return Err(format!(
                "RequireDualStack needs two families but spec.ipFamilies lists only {}",
                families[0]
            ));
        }
        FamilyPolicy::RequireDualStack => {}
    }
    Ok(families)
}

/// Sorted by key, without duplicates (the first of equal keys stays).
fn sorted(services: &[ServiceRequest]) -> Vec<&ServiceRequest> {
    let mut order: Vec<&ServiceRequest> = services.iter().collect();
    order.sort_by(|a, b| a.key.cmp(&b.key));
    order.dedup_by(|a, b| a.key == b.key);
    order
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
