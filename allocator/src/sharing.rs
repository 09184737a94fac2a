//! Who holds each IP, and whether one more Service may join them: `allow-shared-ip`
//! keys, ports and `externalTrafficPolicy`, the rules that let Services share an IP.

use std::net::IpAddr;

use ferrolb_api::Family;
use ferrolb_api::address::to_u128;

use crate::pools::{belongs_to, slot};
use crate::{Allocator, Assignment, PortKey, ServiceKey, ServiceRequest, Traffic};

/// The Services holding one IP, sorted by key. Nearly always one, so a vector, not a
/// tree: at 10,000 IPs a tree node per IP would cost more than everything else.
#[derive(Clone, Debug, Default)]
pub(crate) struct Holders(Vec<(ServiceKey, Holder)>);

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

impl Allocator {
    /// Among the claimants of one IP (sorted by key), those that keep it, in the order to
    /// admit them: the largest class that may share with the IP's present holders and
    /// with each other (same key and traffic policy), the Services whose ports clash with
    /// the fewest others first.
    pub(crate) fn sharers<'s>(
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

    /// Why the Service may not join the current holders of `ip`, if it may not.
    pub(crate) fn sharing_refusal(&self, ip: IpAddr, svc: &ServiceRequest) -> Option<String> {
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
            if other.namespace != svc.key.namespace
                && !svc.current.contains(&ip)
                && let Some(pool) = self.pool_closed_to_other_namespaces(ip, svc)
            {
                return Some(format!(
                    "{ip} is used by {other}, of another namespace; pool {pool:?} lets Services \
                     of different namespaces share an IP only with \
                     spec.allowSharingAcrossNamespaces: true"
                ));
            }
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

    /// The pool `ip` belongs to, when it keeps its IPs within a namespace.
    fn pool_closed_to_other_namespaces(&self, ip: IpAddr, svc: &ServiceRequest) -> Option<&str> {
        let holding = self
            .pools
            .iter()
            .filter(|p| p.contains(ip))
            .map(|p| (&p.config, &p.config));
        let pool = belongs_to(holding, svc.pool.as_deref())?;
        (!pool.share_across_namespaces).then_some(pool.name.as_str())
    }

    pub(crate) fn occupy(&mut self, ip: IpAddr, pool: Option<usize>, svc: &ServiceRequest) {
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

    pub(crate) fn vacate(&mut self, ip: IpAddr, key: &ServiceKey) {
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
