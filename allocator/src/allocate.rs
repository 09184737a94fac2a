//! The allocation policy: which IPs a Service keeps, which it is given, and in which
//! order a whole set of Services is decided (the rules of the [crate docs](crate)).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrolb_api::Family;
use ferrolb_api::address::{from_u128, is_buggy, to_u128};
use ferrolb_api::hash::stable_hash128;

use crate::pools::{Standing, slot};
use crate::{
    Allocator, Assignment, FamilyPolicy, Outcome, ServiceKey, ServiceRequest, Shortfall, Start,
};

/// A Service's position in every pool: from its sharing key when it has one (so Services
/// meant to share start at the same address), else from its namespace and name.
fn position(svc: &ServiceRequest) -> u128 {
    match &svc.sharing_key {
        Some(key) => stable_hash128(&[b"allow-shared-ip", key.as_bytes()]),
        None => stable_hash128(&[svc.key.namespace.as_bytes(), svc.key.name.as_bytes()]),
    }
}

impl Allocator {
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
            Err(reason) => {
                return Outcome::Pending {
                    reason,
                    kind: Shortfall::DualStack,
                };
            }
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
                kind: Shortfall::RequestedUnavailable,
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
                (Some(r), Some(c)) if *r == c => self
                    .keep(svc, c)
                    .map_err(|e| (Shortfall::RequestedUnavailable, format!("requested {e}"))),
                (Some(r), _) => self
                    .check_ip(svc, *r)
                    .map(|pool| (*r, Some(pool), None))
                    .map_err(|e| (Shortfall::RequestedUnavailable, format!("requested {e}"))),
                (None, Some(c)) => self.keep(svc, c).or_else(|_| self.pick(svc, *family)),
                (None, None) => self.pick(svc, *family),
            };
            match chosen {
                Ok((ip, pool, why)) => {
                    self.occupy(ip, pool, svc);
                    stranded.extend(why);
                }
                Err(problem) => problems.push(problem),
            }
        }
        let got = self.assignments(&svc.key).to_vec();
        if problems.is_empty()
            || (svc.family_policy == FamilyPolicy::PreferDualStack && !got.is_empty())
        {
            return if stranded.is_empty() {
                Outcome::Assigned {
                    assignments: got,
                    notes: problems.into_iter().map(|(_, text)| text).collect(),
                }
            } else {
                Outcome::Stranded {
                    assignments: got,
                    reason: stranded.join("; "),
                    notes: problems.into_iter().map(|(_, text)| text).collect(),
                }
            };
        }
        self.release(&svc.key);
        let partial =
            svc.family_policy == FamilyPolicy::RequireDualStack && problems.len() < families.len();
        let prefix = if partial {
            "RequireDualStack needs both families: "
        } else {
            ""
        };
        let texts: Vec<&str> = problems.iter().map(|(_, text)| text.as_str()).collect();
        let kind = problems
            .iter()
            .map(|(kind, _)| *kind)
            .chain(partial.then_some(Shortfall::DualStack))
            .max()
            .unwrap_or(Shortfall::Other);
        Outcome::Pending {
            reason: format!("{prefix}{}", texts.join("; ")),
            kind,
        }
    }

    /// Whether the Service may go on holding `ip`: an error (reading after "requested ")
    /// when it cannot share it with its holders; else the pool and, for a stranded IP,
    /// why it is no longer valid.
    fn keep(&self, svc: &ServiceRequest, ip: IpAddr) -> Result<Chosen, String> {
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

    /// A new IP of `family` for the Service (shaped like [`Allocator::keep`]'s answer).
    fn pick(&self, svc: &ServiceRequest, family: Family) -> Result<Chosen, (Shortfall, String)> {
        if let Some(wanted) = &svc.pool
            && !self.pools.iter().any(|p| p.config.name == *wanted)
        {
            return Err((
                Shortfall::NoPool,
                format!("pool {wanted:?} (annotation ferrolb.io/address-pool) does not exist"),
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
            return Err((Shortfall::NoPool, self.explain_no_pool(svc, family)));
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
        Err((
            Shortfall::Exhausted,
            if names.len() == 1 {
                format!("pool {} is exhausted", names[0])
            } else {
                format!("pools {} are exhausted", names.join(", "))
            },
        ))
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

/// An IP for a Service: the IP, the index of its pool (none when no pool holds it any
/// more) and, for a stranded IP, why it is no longer valid.
type Chosen = (IpAddr, Option<usize>, Option<String>);

/// Sorted by key, without duplicates (the first of equal keys stays).
fn sorted(services: &[ServiceRequest]) -> Vec<&ServiceRequest> {
    let mut order: Vec<&ServiceRequest> = services.iter().collect();
    order.sort_by(|a, b| a.key.cmp(&b.key));
    order.dedup_by(|a, b| a.key == b.key);
    order
}
