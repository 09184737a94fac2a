//! The pools as the allocator keeps them: their address spans, free space and counts,
//! and which pool may serve which Service (`serviceAllocation`, a named pool).

use std::net::IpAddr;

use ferrolb_api::Family;
use ferrolb_api::address::{buggy_count, is_buggy, to_u128};
use ferrolb_api::selector::{self, Labels};

use crate::free::FreeSpace;
use crate::{Allocator, FamilyCounts, PoolConfig, PoolUsage, ServiceRequest};

/// One pool: its configuration, its addresses and which of them are taken.
#[derive(Clone)]
pub(crate) struct PoolState {
    pub(crate) config: PoolConfig,
    /// The pool's addresses as disjoint sorted spans, indexed by [`slot`].
    pub(crate) spans: [Vec<(u128, u128)>; 2],
    /// Indexed by [`slot`].
    pub(crate) free: [FreeSpace; 2],
    /// Addresses that may be handed out (`.0`/`.255` excluded under avoidBuggyIPs).
    pub(crate) total: [u128; 2],
    pub(crate) assigned: [u128; 2],
}

/// Of the pools holding an IP, in order, the one the IP belongs to: the pool `named` (a
/// Service's `address-pool`) if it holds it, else the first usable one, else the first
/// (an invalid pool keeps the IPs it gave out). The allocator, the speakers and `why`
/// all place an IP by this rule.
pub(crate) fn belongs_to<'p, T: Copy>(
    holding: impl Iterator<Item = (T, &'p PoolConfig)> + Clone,
    named: Option<&str>,
) -> Option<T> {
    let find = |pick: &dyn Fn(&PoolConfig) -> bool| holding.clone().find(|(_, c)| pick(c));
    find(&|c| Some(c.name.as_str()) == named)
        .or_else(|| find(&|c| c.usable))
        .or_else(|| holding.clone().next())
        .map(|(t, _)| t)
}

/// Addresses from `first` to `last`, both included; the whole IPv6 space (2^128, one more
/// than a u128 holds) counts as u128::MAX.
fn span_len(first: u128, last: u128) -> u128 {
    (last - first).saturating_add(1)
}

pub(crate) fn slot(family: Family) -> usize {
    match family {
        Family::V4 => 0,
        Family::V6 => 1,
    }
}

impl PoolState {
    pub(crate) fn new(config: PoolConfig) -> PoolState {
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
                    span_len(s, e) - buggy
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

    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        self.config.ranges.iter().any(|r| r.contains(ip))
    }

    pub(crate) fn has_family(&self, family: Family) -> bool {
        self.config.ranges.iter().any(|r| r.family() == family)
    }

    /// Where a search for a free address starts: the address at `position` (modulo the
    /// pool's size) counting through the pool's spans in order.
    pub(crate) fn start(&self, family: Family, position: u128) -> Option<u128> {
        let spans = &self.spans[slot(family)];
        let size = spans
            .iter()
            .map(|(s, e)| span_len(*s, *e))
            .fold(0u128, u128::saturating_add);
        if size == 0 {
            return None;
        }
        let mut offset = position % size;
        for (s, e) in spans {
            let len = span_len(*s, *e);
            if offset < len {
                return Some(s + offset);
            }
            offset -= len;
        }
        None
    }
}

/// Whether a Service may go on holding an IP, as far as pools are concerned.
pub(crate) enum Standing {
    /// In a pool open to it (or in an unusable pool, which keeps its holders).
    Valid(usize),
    /// Kept, but no longer valid: the pool, if any, and why.
    Stranded(Option<usize>, String),
}

impl Allocator {
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

    /// Whether a held IP is still valid for the Service, pools-wise.
    pub(crate) fn standing(&self, svc: &ServiceRequest, ip: IpAddr) -> Standing {
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

    /// The pool an IP belongs to, by [`belongs_to`].
    pub(crate) fn pool_of(&self, ip: IpAddr, svc: &ServiceRequest) -> Option<usize> {
        let holding = (0..self.pools.len())
            .filter(|&i| self.pools[i].contains(ip))
            .map(|i| (i, &self.pools[i].config));
        belongs_to(holding, svc.pool.as_deref())
    }

    /// Why a pool does not serve this Service, if it does not (autoAssign and
    /// usability aside).
    pub(crate) fn refusal(&self, pool: usize, svc: &ServiceRequest) -> Option<String> {
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

    pub(crate) fn explain_no_pool(&self, svc: &ServiceRequest, family: Family) -> String {
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
}
