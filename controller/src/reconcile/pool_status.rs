//! The status ferrolb writes on each IPAddressPool: its conditions (Ready, Invalid,
//! Overlapping, Stranded) and address counts, for `kubectl get ipaddresspools`.
//!
//! Built from what the reconciler remembers and compared with what the pool says, so that
//! a status is written only when a condition or a count changes, not on every reconcile.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrolb_allocator::Outcome;
use ferrolb_api::IPAddressPoolStatus;
use ferrolb_api::validation::ProblemKind;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::events::plural;
use super::{Action, Reconciler};

/// Pool condition types.
pub const READY: &str = "Ready";
pub const INVALID: &str = "Invalid";
pub const OVERLAPPING: &str = "Overlapping";
pub const STRANDED: &str = "Stranded";
pub const TAKEN: &str = "AddressesTaken";
/// The most IPs an AddressesTaken message lists (the rest are counted).
const TAKEN_LISTED: usize = 10;
/// The Ready condition's reason for a `fromNodeNetwork` pool not resolved (yet).
pub const UNRESOLVED: &str = "NotResolved";

impl Reconciler {
    /// Pool statuses that differ from what the pools say; conditions that change get
    /// `now` as their transition time. `taken`: the IPs held back because another host
    /// answers for them, with who (from the nodes' records).
    pub fn pool_statuses(&self, now: &Time, taken: &BTreeMap<IpAddr, String>) -> Vec<Action> {
        if !self.started {
            return Vec::new();
        }
        let usage: BTreeMap<String, _> = self
            .allocator
            .usage()
            .into_iter()
            .map(|u| (u.name.clone(), u))
            .collect();
        let stranded = self.stranded_by_pool();
        let taken = self.taken_by_pool(taken);
        let mut actions = Vec::new();
        for (name, pool) in &self.pools {
            let observed = pool.object.status.clone().unwrap_or_default();
            // What the speakers resolved is theirs: kept as it is.
            let mut desired = IPAddressPoolStatus {
                node_network: observed.node_network.clone(),
                ..Default::default()
            };
            if let Some(u) = usage.get(name) {
                desired.assigned_ipv4 = u64::try_from(u.assigned.ipv4).unwrap_or(u64::MAX);
                desired.available_ipv4 = u64::try_from(u.available.ipv4).unwrap_or(u64::MAX);
                desired.assigned_ipv6 = u.assigned.ipv6.to_string();
                desired.available_ipv6 = u.available.ipv6.to_string();
            }
            let generation = pool.object.metadata.generation;
            let condition = |type_: &str, status: bool, reason: &str, message: String| {
                let status = if status { "True" } else { "False" };
                let kept = observed.conditions.iter().find(|c| {
                    c.type_ == type_
                        && c.status == status
                        && c.reason == reason
                        && c.message == message
                });
                Condition {
                    type_: type_.to_string(),
                    status: status.to_string(),
                    reason: reason.to_string(),
                    message,
                    observed_generation: generation,
                    last_transition_time: kept
                        .map(|c| c.last_transition_time.clone())
                        .unwrap_or_else(|| now.clone()),
                }
            };
            let problems = pool
                .checked
                .as_ref()
                .map(|c| c.problems.clone())
                .unwrap_or_default();
            let of = |kind: ProblemKind| -> Vec<String> {
                problems
                    .iter()
                    .filter(|p| p.kind == kind)
                    .map(|p| p.message.clone())
                    .collect()
            };
            let (invalid, overlapping) = (of(ProblemKind::Invalid), of(ProblemKind::Overlapping));
            let unresolved = of(ProblemKind::Unresolved);
            let field = pool.object.entries().0;
            desired.conditions.push(
                match (invalid.first(), overlapping.first(), unresolved.first()) {
                    (Some(m), _, _) => condition(READY, false, INVALID, m.clone()),
                    (None, Some(m), _) => condition(READY, false, OVERLAPPING, m.clone()),
                    (None, None, Some(m)) => condition(READY, false, UNRESOLVED, m.clone()),
                    (None, None, None) => condition(
                        READY,
                        true,
                        "AddressesValid",
                        format!("every entry of {field} is valid and overlaps no other pool"),
                    ),
                },
            );
            if !invalid.is_empty() {
                desired.conditions.push(condition(
                    INVALID,
                    true,
                    "InvalidAddresses",
                    invalid.join("; "),
                ));
            }
            if !overlapping.is_empty() {
                desired.conditions.push(condition(
                    OVERLAPPING,
                    true,
                    "OverlapsAnotherPool",
                    overlapping.join("; "),
                ));
            }
            if let Some(lines) = stranded.get(name) {
                desired.conditions.push(condition(
                    STRANDED,
                    true,
                    "AddressesKeptOutsidePool",
                    format!(
                        "{} kept in place though the pool no longer gives them out; they move only when their Services change: {}",
                        plural(lines.len(), "address is", "addresses are"),
                        lines.join("; ")
                    ),
                ));
            }
            if let Some(lines) = taken.get(name) {
                let listed: Vec<&str> = lines
                    .iter()
                    .take(TAKEN_LISTED)
                    .map(String::as_str)
                    .collect();
                let more = lines.len() - listed.len();
                desired.conditions.push(condition(
                    TAKEN,
                    true,
                    "AnsweredByAnotherHost",
                    format!(
                        "{} {} answered by another host on the network, so ferrolb does not announce {}: {}{}",
                        lines.len(),
                        plural(lines.len(), "address is", "addresses are"),
                        if lines.len() == 1 { "it" } else { "them" },
                        listed.join("; "),
                        if more > 0 { format!("; and {more} more") } else { String::new() }
                    ),
                ));
            }
            if !same_status(&observed, &desired) {
                actions.push(Action::PoolStatus {
                    name: name.clone(),
                    status: desired,
                });
            }
        }
        actions
    }

    /// Per pool, one line per stranded IP that the pool gave out.
    fn stranded_by_pool(&self) -> BTreeMap<String, Vec<String>> {
        let mut by_pool: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (key, record) in &self.services {
            let Some(Outcome::Stranded { reason, .. }) = &record.outcome else {
                continue;
            };
            for (ip, pool) in &record.from_pool {
                if reason.contains(&ip.to_string()) && self.pools.contains_key(pool) {
                    by_pool
                        .entry(pool.clone())
                        .or_default()
                        .push(format!("{ip} ({key})"));
                }
            }
        }
        by_pool
    }
}

impl Reconciler {
    /// Per pool, one line per IP it gave out that another host answers for.
    fn taken_by_pool(&self, taken: &BTreeMap<IpAddr, String>) -> BTreeMap<String, Vec<String>> {
        let mut by_pool: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if taken.is_empty() {
            return by_pool;
        }
        for (key, record) in &self.services {
            for (ip, pool) in &record.from_pool {
                if let Some(who) = taken.get(ip)
                    && self.pools.contains_key(pool)
                {
                    by_pool
                        .entry(pool.clone())
                        .or_default()
                        .push(format!("{ip} ({key}) by {who}"));
                }
            }
        }
        // A shared IP is listed once per Service; sorted by IP, then Service.
        for lines in by_pool.values_mut() {
            lines.sort();
        }
        by_pool
    }
}

/// Statuses equal but for the conditions' transition times.
fn same_status(a: &IPAddressPoolStatus, b: &IPAddressPoolStatus) -> bool {
    let key = |s: &IPAddressPoolStatus| {
        s.conditions
            .iter()
            .map(|c| {
                (
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                    c.observed_generation,
                )
            })
            .collect::<Vec<_>>()
    };
    key(a) == key(b)
        && a.assigned_ipv4 == b.assigned_ipv4
        && a.available_ipv4 == b.available_ipv4
        && a.assigned_ipv6 == b.assigned_ipv6
        && a.available_ipv6 == b.available_ipv6
}
