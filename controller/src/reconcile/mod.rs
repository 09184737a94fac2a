//! What the controller writes, decided from what it observes.
//!
//! Pure: Kubernetes objects in, [`Action`]s out; no client, no tokio. The `kubernetes`
//! module feeds it from watches and carries the actions out, reporting back what was
//! written. Every rule about when to write lives here, so it is tested without an API
//! server:
//!
//! * Nothing is decided before [`Reconciler::start`] has seen every Service, pool and
//!   namespace: every IP already in a Service's status is adopted first, so a restart or
//!   a leader change never moves one.
//! * Writes follow changes: a Service's status is written only when what it should say
//!   differs from what it says, an Event only when what it tells a person changes (a
//!   Service that stays pending gets one AllocationFailed, not one per reconcile), a
//!   pool's status only when its conditions or counts change.
//! * Bad input loses nothing that works: a Service whose annotations become invalid keeps
//!   its IPs and gets a warning; a pool edit or deletion that strands an assigned IP
//!   leaves it in place and says so.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrolb_api::selector::Labels;
use ferrolb_api::validation::CheckedPool;
use ferrolb_api::{AddressEntry, Family, IPAddressPool, IPAddressPoolStatus};
use k8s_openapi::api::core::v1::{Namespace, Service};

use ferrolb_allocator::input::{self, Translation, ingress_ips};
use ferrolb_allocator::{
    Allocator, Assignment, FamilyPolicy, Outcome, ServiceKey, ServiceRequest, Shortfall, Start,
};

mod events;
mod pool_status;

/// The allocation-failure label of a Service whose own request cannot be honoured;
/// the allocator's [`Shortfall`] labels the rest.
const INVALID_SERVICE_FAILURE: &str = "invalid_service";

pub use events::{
    ALLOCATION_FAILED, INVALID_SERVICE, IP_ALLOCATED, IP_RELEASED, IP_STRANDED, STATUS_CONFLICT,
};

/// The field manager of the controller's writes of Service IPs.
pub const FIELD_MANAGER: &str = "ferrolb-controller";
pub use pool_status::{INVALID, OVERLAPPING, READY, STRANDED, TAKEN, UNRESOLVED};

/// Something to write to the API server.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Make `status.loadBalancer.ingress` list exactly `ips` (none: clear it), provided
    /// the Service is still at `resource_version`.
    ServiceStatus {
        key: ServiceKey,
        ips: Vec<IpAddr>,
        resource_version: Option<String>,
    },
    /// An Event on the Service, for `kubectl describe svc`.
    Event(ServiceEvent),
    /// Replace the pool's status.
    PoolStatus {
        name: String,
        status: IPAddressPoolStatus,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEvent {
    pub key: ServiceKey,
    pub uid: Option<String>,
    pub warning: bool,
    /// `IPAllocated`, `AllocationFailed`, `IPReleased`, `IPStranded` or `InvalidService`.
    pub reason: &'static str,
    pub message: String,
    /// For AllocationFailed: the kind of failure, a metric label.
    pub failure: Option<&'static str>,
}

/// What the last Event about a Service said, so the next one is sent only on change.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Report {
    Assigned(Vec<IpAddr>),
    Stranded(Vec<IpAddr>, String),
    /// No IP: why, and the allocation-failure metric's label for it.
    Pending(String, &'static str),
    /// Invalid, keeping these IPs.
    Invalid(Vec<IpAddr>, String),
    /// The last Event (or the status it told of) could not be written: tell it again.
    Untold,
    /// Another writer changed the IPs: told once, however often it writes again.
    Contested(Contest),
}

#[derive(Clone, Debug)]
struct Record {
    uid: Option<String>,
    resource_version: Option<String>,
    /// Ingress IPs in the last object seen (or written).
    observed: Vec<IpAddr>,
    /// The request as last read (its `current` empty), or why it cannot be honoured.
    request: Result<ServiceRequest, String>,
    /// While `request` is invalid, the last one that was valid: what the Service keeps
    /// holding its IPs by.
    last_valid: Option<Box<ServiceRequest>>,
    /// Families in the Service's order, for the order of ingress entries.
    families: Vec<Family>,
    outcome: Option<Outcome>,
    reported: Option<Report>,
    /// The pool each held IP was given from, so that a pool edit that strands it can be
    /// reported on that pool.
    from_pool: BTreeMap<IpAddr, String>,
    /// The IPs the controller last wrote (or found already written as it decided), and
    /// the resourceVersion of that status.
    written: Option<(Vec<IpAddr>, u64)>,
    /// Someone else changed the IPs the controller wrote: it writes this Service's
    /// status no more until the Service changes.
    contested: Option<Contest>,
}

/// Another writer of a Service's IPs.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Contest {
    /// Its field manager (`metallb-controller`, ...).
    by: String,
    /// What the controller had written.
    ours: Vec<IpAddr>,
    /// What the other writer put there.
    theirs: Vec<IpAddr>,
}

#[derive(Clone, Debug)]
struct PoolRecord {
    object: IPAddressPool,
    checked: Option<CheckedPool>,
}

/// The controller's memory. See the [module docs](self).
pub struct Reconciler {
    class: String,
    started: bool,
    allocator: Allocator,
    pools: BTreeMap<String, PoolRecord>,
    namespaces: BTreeMap<String, Labels>,
    services: BTreeMap<ServiceKey, Record>,
}

impl Reconciler {
    /// `class` is the `spec.loadBalancerClass` served besides no class at all.
    pub fn new(class: impl Into<String>) -> Reconciler {
        Reconciler {
            class: class.into(),
            started: false,
            allocator: Allocator::new(Vec::new(), BTreeMap::new(), Start::Lowest),
            pools: BTreeMap::new(),
            namespaces: BTreeMap::new(),
            services: BTreeMap::new(),
        }
    }

    pub fn is_started(&self) -> bool {
        self.started
    }

    /// Takes in the whole cluster once the watches have synced: adopts every IP already
    /// in status, then decides the Services that have none. Returns every write needed.
    ///
    /// The Services are those given here and those applied before: a watch's initial
    /// list is fed through [`Reconciler::service_applied`] as it arrives, so that nobody
    /// holds every Service object at once.
    pub fn start(
        &mut self,
        pools: &[IPAddressPool],
        namespaces: &[Namespace],
        services: &[Service],
    ) -> Vec<Action> {
        self.set_pools(pools);
        self.namespaces = input::namespace_labels(namespaces);
        for svc in services {
            if let Some(record) = self.read(svc, None) {
                self.services.insert(input::service_key(svc), record);
            }
        }
        self.started = true;
        self.reallocate()
    }

    /// A Service was created or changed (or came back from a write).
    pub fn service_applied(&mut self, svc: &Service) -> Vec<Action> {
        let key = input::service_key(svc);
        let previous = self.services.remove(&key);
        let Some(mut record) = self.read(svc, previous.as_ref()) else {
            // Not ours (any more).
            let Some(previous) = previous else {
                return Vec::new();
            };
            return self.no_longer_ours(key, previous, svc);
        };
        let unchanged = previous.as_ref().is_some_and(|p| {
            p.request == record.request && p.outcome.is_some() && p.observed == record.observed
        });
        if let Some(p) = &previous {
            record.outcome = p.outcome.clone();
            record.reported = p.reported.clone();
            record.from_pool = p.from_pool.clone();
            record.written = p.written.clone();
            // A Service whose request changed (not merely its labels, which tools edit
            // freely) is tried again.
            if p.contested.is_some() && !asks_differently(&p.request, &record.request) {
                record.contested = p.contested.clone();
            }
        }
        // The IPs the controller wrote were changed by a later write not its own: another
        // controller serves this Service too. Fighting it would flap the IP.
        if let Some((ours, at)) = &record.written
            && version(&record.resource_version) > *at
            && record.observed != *ours
        {
            let by = input::ingress_writer(svc).unwrap_or("an unknown writer");
            record.contested = Some(Contest {
                by: by.to_string(),
                ours: ours.clone(),
                theirs: record.observed.clone(),
            });
            record.written = None;
        }
        self.services.insert(key.clone(), record);
        if !self.started || unchanged {
            return Vec::new();
        }
        let before = self.allocator.assignments(&key).to_vec();
        self.decide(&key);
        let mut actions = self.settle(&key);
        if self.freed(&before, &key) {
            actions.extend(self.retry_pending(&key));
        }
        actions
    }

    /// A Service was deleted: its IPs go back to the pool, and pending Services get
    /// another chance.
    pub fn service_deleted(&mut self, key: &ServiceKey) -> Vec<Action> {
        if self.services.remove(key).is_none() {
            return Vec::new();
        }
        let freed = !self.allocator.assignments(key).is_empty();
        self.allocator.release(key);
        if !self.started || !freed {
            return Vec::new();
        }
        self.retry_pending(key)
    }

    /// The complete list of pools, after any pool event. Only a change of a spec (seen
    /// as a new generation), of the addresses a `fromNodeNetwork` pool resolved to, a
    /// new pool or a deleted one re-runs allocation; other status updates (ours) do not.
    pub fn pools_applied(&mut self, pools: &[IPAddressPool]) -> Vec<Action> {
        // A pool deleted and created again under its name has a new uid, generation 1.
        type Spec = (String, Option<String>, Option<i64>, Vec<AddressEntry>);
        let specs = |m: &BTreeMap<String, PoolRecord>| -> Vec<Spec> {
            m.iter()
                .map(|(n, p)| {
                    let meta = &p.object.metadata;
                    let entries = p.object.entries().1.to_vec();
                    (n.clone(), meta.uid.clone(), meta.generation, entries)
                })
                .collect()
        };
        let before = specs(&self.pools);
        self.set_pools(pools);
        if !self.started || before == specs(&self.pools) {
            return Vec::new();
        }
        self.reallocate()
    }

    /// The complete list of namespaces. Only their labels matter (namespaceSelectors).
    pub fn namespaces_applied(&mut self, namespaces: &[Namespace]) -> Vec<Action> {
        let labels = input::namespace_labels(namespaces);
        if labels == self.namespaces {
            return Vec::new();
        }
        self.namespaces = labels;
        // Namespace labels matter only to pools that select namespaces by label.
        let selects = self.pools.values().any(|p| {
            p.object
                .spec
                .service_allocation
                .as_ref()
                .is_some_and(|a| !a.namespace_selectors.is_empty())
        });
        if !self.started || !selects {
            return Vec::new();
        }
        self.reallocate()
    }

    /// A status write succeeded; `service` is what the API server answered.
    pub fn service_written(&mut self, service: &Service) {
        if let Some(r) = self.services.get_mut(&input::service_key(service)) {
            r.observed = ingress_ips(service);
            r.resource_version = service.metadata.resource_version.clone();
            r.written = Some((r.observed.clone(), version(&r.resource_version)));
        }
    }

    /// A write for the Service failed (its status, or an Event): what its Events said is
    /// forgotten, so that the retry tells it again.
    pub fn write_failed(&mut self, key: &ServiceKey) {
        if let Some(r) = self.services.get_mut(key) {
            r.reported = Some(Report::Untold);
        }
    }

    /// A pool status write succeeded.
    pub fn pool_written(&mut self, name: &str, status: IPAddressPoolStatus) {
        if let Some(p) = self.pools.get_mut(name) {
            p.object.status = Some(status);
        }
    }

    /// The actions that bring one Service's status in line with what was decided, for a
    /// retry after a failed write.
    pub fn resync(&mut self, key: &ServiceKey) -> Vec<Action> {
        if !self.started || !self.services.contains_key(key) {
            return Vec::new();
        }
        self.settle(key)
    }

    /// Addresses in use and total per pool and family, for metrics.
    pub fn usage(&self) -> Vec<ferrolb_allocator::PoolUsage> {
        self.allocator.usage()
    }

    /// How many Services are pending, and how many hold stranded IPs.
    pub fn counts(&self) -> (usize, usize) {
        let pending = self
            .services
            .keys()
            .filter(|k| self.allocator.assignments(k).is_empty())
            .count();
        let stranded = self
            .services
            .values()
            .filter(|r| matches!(r.outcome, Some(Outcome::Stranded { .. })))
            .count();
        (pending, stranded)
    }

    fn set_pools(&mut self, pools: &[IPAddressPool]) {
        let (_, checked) = input::pool_configs(pools);
        self.pools = pools
            .iter()
            .map(|p| {
                let name = p.metadata.name.clone().unwrap_or_default();
                let checked = checked.iter().find(|c| c.name == name).cloned();
                (
                    name,
                    PoolRecord {
                        object: p.clone(),
                        checked,
                    },
                )
            })
            .collect();
    }

    /// A fresh record for `svc` when it is ours.
    fn read(&self, svc: &Service, previous: Option<&Record>) -> Option<Record> {
        let request = match input::translate_for_class(svc, &self.class) {
            Translation::NotOurs => return None,
            Translation::Request(mut r) => {
                r.current.clear();
                Ok(*r)
            }
            Translation::Invalid { reason, .. } => Err(reason),
        };
        let families = match &request {
            Ok(r) => r.families.clone(),
            Err(_) => previous.map(|p| p.families.clone()).unwrap_or_default(),
        };
        // Kept only while the Service is invalid: what it holds its IPs by.
        let last_valid = match &request {
            Ok(_) => None,
            Err(_) => previous.and_then(|p| match &p.request {
                Ok(r) => Some(Box::new(r.clone())),
                Err(_) => p.last_valid.clone(),
            }),
        };
        Some(Record {
            uid: svc.metadata.uid.clone(),
            resource_version: svc.metadata.resource_version.clone(),
            observed: ingress_ips(svc),
            request,
            last_valid,
            families,
            outcome: None,
            reported: None,
            from_pool: BTreeMap::new(),
            written: None,
            contested: None,
        })
    }

    /// The request to decide with: what the Service asks, holding what the controller
    /// gave it (its memory is ahead of the watch), else what its status says.
    fn effective_request(&self, key: &ServiceKey) -> Option<ServiceRequest> {
        let record = &self.services[key];
        let held: Vec<IpAddr> = self
            .allocator
            .assignments(key)
            .iter()
            .map(|a| a.ip)
            .collect();
        // Status speaks for the Service only until the controller has decided it: after
        // that, an IP it gave up stays given up even while the clearing write is pending.
        let held = if held.is_empty() && record.outcome.is_none() && record.reported.is_none() {
            record.observed.clone()
        } else {
            held
        };
        holding(key, record, held)
    }

    /// Decides one Service with the allocator as it stands.
    fn decide(&mut self, key: &ServiceKey) {
        if self.services[key].contested.is_some() {
            // Hold what the other writer put there, so that no other Service gets it;
            // decide nothing.
            let observed = self.services[key].observed.clone();
            self.allocator.release(key);
            if !observed.is_empty() {
                self.allocator.adopt(&[hold_request(key, observed)]);
            }
            self.note_pools(key);
            self.services
                .get_mut(key)
                .expect("decided services exist")
                .outcome = None;
            return;
        }
        let request = self.effective_request(key);
        let valid = self.services[key].request.is_ok();
        let outcome = match request {
            Some(r) if valid => Some(self.allocator.assign(&r)),
            Some(r) => {
                // Invalid, holding IPs: take them back as they were, decide nothing new.
                self.allocator.release(key);
                self.allocator.adopt(std::slice::from_ref(&r));
                None
            }
            None => {
                self.allocator.release(key);
                None
            }
        };
        self.note_pools(key);
        self.services
            .get_mut(key)
            .expect("decided services exist")
            .outcome = outcome;
    }

    /// Re-runs allocation over everything (after a pool or namespace change), keeping
    /// what each Service holds.
    fn reallocate(&mut self) -> Vec<Action> {
        let (configs, _) = input::pool_configs(
            &self
                .pools
                .values()
                .map(|p| p.object.clone())
                .collect::<Vec<_>>(),
        );
        let previous = std::mem::replace(
            &mut self.allocator,
            Allocator::new(configs, self.namespaces.clone(), Start::Lowest),
        );
        let keys: Vec<ServiceKey> = self.services.keys().cloned().collect();
        let mut requests = Vec::new();
        let mut invalid_holders = Vec::new();
        for key in &keys {
            let record = &self.services[key];
            let held: Vec<IpAddr> = match (&record.outcome, &record.reported) {
                (Some(o), _) => o.assignments().iter().map(|a| a.ip).collect(),
                // Invalid holders have no outcome: what the allocator held for them.
                (None, Some(_)) => previous.assignments(key).iter().map(|a| a.ip).collect(),
                // Not decided yet: what status says.
                (None, None) => record.observed.clone(),
            };
            match holding(key, record, held) {
                Some(r) if record.request.is_ok() => requests.push(r),
                Some(r) => invalid_holders.push(r),
                None => {}
            }
        }
        // Invalid Services hold first: their IPs are nobody else's to take.
        self.allocator.adopt(&invalid_holders);
        let outcomes = self.allocator.allocate_all(&requests);
        for key in &keys {
            let outcome = outcomes.get(key).cloned();
            self.note_pools(key);
            self.services.get_mut(key).expect("listed above").outcome = outcome;
        }
        keys.iter().flat_map(|k| self.settle(k)).collect()
    }

    /// Remembers the pool each newly held IP came from.
    fn note_pools(&mut self, key: &ServiceKey) {
        let held = self.allocator.assignments(key).to_vec();
        let record = self.services.get_mut(key).expect("noted services exist");
        record
            .from_pool
            .retain(|ip, _| held.iter().any(|a| a.ip == *ip));
        for a in held {
            if !a.pool.is_empty() {
                record.from_pool.insert(a.ip, a.pool);
            }
        }
    }

    /// Whether `key` holds fewer IPs than `before`.
    fn freed(&self, before: &[Assignment], key: &ServiceKey) -> bool {
        let now = self.allocator.assignments(key);
        before.iter().any(|a| !now.iter().any(|b| b.ip == a.ip))
    }

    /// Gives every pending Service another try (after IPs were freed), requested IPs
    /// first, then by namespace/name.
    fn retry_pending(&mut self, except: &ServiceKey) -> Vec<Action> {
        let mut pending: Vec<(bool, ServiceKey)> = self
            .services
            .iter()
            .filter(|(k, r)| {
                *k != except
                    && r.request.is_ok()
                    && matches!(r.outcome, Some(Outcome::Pending { .. }))
            })
            .map(|(k, r)| {
                let requests_ip = r.request.as_ref().is_ok_and(|r| !r.requested.is_empty());
                (!requests_ip, k.clone())
            })
            .collect();
        pending.sort();
        let mut actions = Vec::new();
        for (_, key) in pending {
            self.decide(&key);
            actions.extend(self.settle(&key));
        }
        actions
    }

    fn no_longer_ours(&mut self, key: ServiceKey, previous: Record, svc: &Service) -> Vec<Action> {
        let held: Vec<IpAddr> = self
            .allocator
            .assignments(&key)
            .iter()
            .map(|a| a.ip)
            .collect();
        self.allocator.release(&key);
        if !self.started {
            return Vec::new();
        }
        let mut actions = Vec::new();
        let is_load_balancer = svc
            .spec
            .as_ref()
            .is_some_and(|s| s.type_.as_deref() == Some("LoadBalancer"));
        // A LoadBalancer of another class is that class's controller's to write.
        let observed = ingress_ips(svc);
        if !is_load_balancer && !observed.is_empty() {
            actions.push(Action::ServiceStatus {
                key: key.clone(),
                ips: Vec::new(),
                resource_version: svc.metadata.resource_version.clone(),
            });
        }
        if !held.is_empty() {
            actions.push(events::no_longer_ours(
                &key,
                previous.uid.clone(),
                &held,
                is_load_balancer,
            ));
        }
        actions.extend(self.retry_pending(&key));
        actions
    }

    /// The writes that make the API say what was decided for one Service.
    fn settle(&mut self, key: &ServiceKey) -> Vec<Action> {
        let held = self.allocator.assignments(key).to_vec();
        let record = self.services.get_mut(key).expect("settled services exist");
        let mut ips: Vec<IpAddr> = held.iter().map(|a| a.ip).collect();
        // The Service's primary family first, as Kubernetes orders dual-stack fields.
        ips.sort_by_key(|ip| {
            record
                .families
                .iter()
                .position(|f| *f == Family::of(*ip))
                .unwrap_or(usize::MAX)
        });
        let mut actions = Vec::new();
        if let Some(contest) = &record.contested {
            let report = Report::Contested(contest.clone());
            let before = record.reported.replace(report.clone());
            if before.as_ref() != Some(&report) {
                actions.extend(events::told(key, record, before.as_ref(), &report, &held));
            }
            return actions;
        }
        if ips != record.observed {
            actions.push(Action::ServiceStatus {
                key: key.clone(),
                ips: ips.clone(),
                resource_version: record.resource_version.clone(),
            });
        } else {
            // The status says what was decided: the controller stands behind it as if it
            // had written it, so that a later write by another controller is seen as one.
            record.written = Some((ips.clone(), version(&record.resource_version)));
        }
        let report = match (&record.request, &record.outcome) {
            (Err(reason), _) if ips.is_empty() => {
                Report::Pending(reason.clone(), INVALID_SERVICE_FAILURE)
            }
            (Err(reason), _) => Report::Invalid(ips.clone(), reason.clone()),
            (Ok(_), Some(Outcome::Stranded { reason, .. })) => {
                Report::Stranded(ips.clone(), reason.clone())
            }
            (Ok(_), Some(Outcome::Assigned { .. })) => Report::Assigned(ips.clone()),
            (Ok(_), Some(Outcome::Pending { reason, kind })) => {
                Report::Pending(reason.clone(), kind.label())
            }
            (Ok(_), None) => {
                Report::Pending("not decided yet".to_string(), Shortfall::Other.label())
            }
        };
        let before = record.reported.replace(report.clone());
        // After a restart, a Service whose status already says what was decided needs
        // no Event: one was sent when it happened.
        let silent =
            before.is_none() && matches!(report, Report::Assigned(_)) && actions.is_empty();
        if before.as_ref() == Some(&report) || silent {
            return actions;
        }
        actions.extend(events::told(key, record, before.as_ref(), &report, &held));
        actions
    }
}

/// Whether two reads of a Service ask for something different, its labels aside.
fn asks_differently(
    a: &Result<ServiceRequest, String>,
    b: &Result<ServiceRequest, String>,
) -> bool {
    let unlabelled = |r: &Result<ServiceRequest, String>| {
        r.clone().map(|mut r| {
            r.labels.clear();
            r
        })
    };
    unlabelled(a) != unlabelled(b)
}

/// A resourceVersion as a number, to tell a later write from an earlier one (the API
/// server's are increasing integers); 0 when it is not one.
fn version(rv: &Option<String>) -> u64 {
    rv.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The request to decide a Service with, holding `held`: what it asks for while it is
/// valid. An invalid Service keeps what it holds under its last valid request, or under
/// one built from its status, asking for nothing new; holding nothing, it has none.
fn holding(key: &ServiceKey, record: &Record, held: Vec<IpAddr>) -> Option<ServiceRequest> {
    match &record.request {
        Ok(r) => Some(ServiceRequest {
            current: held,
            ..r.clone()
        }),
        Err(_) if held.is_empty() => None,
        Err(_) => Some(match &record.last_valid {
            Some(r) => ServiceRequest {
                current: held,
                requested: Vec::new(),
                ..(**r).clone()
            },
            None => hold_request(key, held),
        }),
    }
}

/// A request that only holds `ips`, for an invalid Service the controller has no valid
/// request of (it became invalid while the controller was down).
fn hold_request(key: &ServiceKey, ips: Vec<IpAddr>) -> ServiceRequest {
    let mut families: Vec<Family> = ips.iter().map(|ip| Family::of(*ip)).collect();
    families.dedup();
    ServiceRequest {
        key: key.clone(),
        family_policy: if families.len() > 1 {
            FamilyPolicy::RequireDualStack
        } else {
            FamilyPolicy::SingleStack
        },
        families,
        current: ips,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
