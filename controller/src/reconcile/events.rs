//! The Events a Service gets, in words: what `kubectl describe svc` tells a person.
//!
//! When an Event is due is the reconciler's call (only when what it tells changes); what
//! it says lives here, so the wording can be read and changed in one place.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ferrolb_allocator::{Assignment, ServiceKey};

use super::{Action, Record, Report, ServiceEvent};

/// Event reasons.
pub const IP_ALLOCATED: &str = "IPAllocated";
pub const ALLOCATION_FAILED: &str = "AllocationFailed";
pub const IP_RELEASED: &str = "IPReleased";
pub const IP_STRANDED: &str = "IPStranded";
pub const INVALID_SERVICE: &str = "InvalidService";
pub const STATUS_CONFLICT: &str = "StatusConflict";

/// The Events telling how a Service changed since it was last told of (`before`): it
/// now stands as `report`, holding `held`.
pub(super) fn told(
    key: &ServiceKey,
    record: &Record,
    before: Option<&Report>,
    report: &Report,
    held: &[Assignment],
) -> Vec<Action> {
    let mut actions = Vec::new();
    let event = |warning: bool, reason: &'static str, message: String, failure| {
        Action::Event(ServiceEvent {
            key: key.clone(),
            uid: record.uid.clone(),
            warning,
            reason,
            message,
            failure,
        })
    };
    let had: Vec<IpAddr> = match before {
        Some(Report::Assigned(h) | Report::Stranded(h, _) | Report::Invalid(h, _)) => h.clone(),
        _ => Vec::new(),
    };
    match report {
        Report::Assigned(now) => {
            if had != *now {
                let pools: BTreeSet<&str> = held.iter().map(|a| a.pool.as_str()).collect();
                let pools: Vec<&str> = pools.into_iter().collect();
                let mut message = format!(
                    "Assigned {} from {} {}",
                    list(now),
                    plural(pools.len(), "pool", "pools"),
                    pools.join(", ")
                );
                if !had.is_empty() {
                    message.push_str(&format!(" (was {})", list(&had)));
                }
                actions.push(event(false, IP_ALLOCATED, message, None));
            }
        }
        Report::Stranded(_, reason) => {
            actions.push(event(
                true,
                IP_STRANDED,
                format!("{reason}; the IP stays assigned until this Service changes"),
                None,
            ));
        }
        Report::Pending(reason, failure) => {
            if !had.is_empty() {
                actions.push(event(
                    false,
                    IP_RELEASED,
                    format!("Released {}", list(&had)),
                    None,
                ));
            }
            actions.push(event(
                true,
                ALLOCATION_FAILED,
                reason.clone(),
                Some(failure),
            ));
        }
        // Only ever remembered, never decided.
        Report::Untold => {}
        Report::Contested(contest) => {
            let by = if contest.by == super::FIELD_MANAGER {
                format!("another ferrolb controller (field manager {})", contest.by)
            } else {
                format!("{:?}", contest.by)
            };
            actions.push(event(
                true,
                STATUS_CONFLICT,
                format!(
                    "status.loadBalancer.ingress was changed to {} by {by} after ferrolb \
                     wrote {}: another controller serves this Service too. ferrolb writes \
                     its status no more until the Service changes; give one of the two \
                     controllers a spec.loadBalancerClass, or remove the other",
                    list_or_nothing(&contest.theirs),
                    list_or_nothing(&contest.ours)
                ),
                None,
            ));
        }
        Report::Invalid(kept, reason) => {
            actions.push(event(
                true,
                INVALID_SERVICE,
                format!("{reason}; keeping {} until this is fixed", list(kept)),
                None,
            ));
        }
    }
    actions
}

/// The Event for a Service that stopped being ferrolb's while holding `held`.
pub(super) fn no_longer_ours(
    key: &ServiceKey,
    uid: Option<String>,
    held: &[IpAddr],
    is_load_balancer: bool,
) -> Action {
    let why = if is_load_balancer {
        "its loadBalancerClass is no longer ferrolb's"
    } else {
        "it is no longer of type LoadBalancer"
    };
    Action::Event(ServiceEvent {
        key: key.clone(),
        uid,
        warning: false,
        reason: IP_RELEASED,
        message: format!("Released {}: {why}", list(held)),
        failure: None,
    })
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(|ip| ip.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        one.to_string()
    } else {
        many.to_string()
    }
}

fn list_or_nothing(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        "nothing".to_string()
    } else {
        list(ips)
    }
}
