//! Checks of pools that the API server cannot do alone: the exact meaning of each
//! address entry, overlaps inside one pool and between pools, and selector syntax.
//!
//! An unusable pool is never silently dropped: it keeps the ranges that do parse (so
//! Services already holding an IP there keep it) and carries problems that become its
//! status conditions, each naming the field and, for overlaps, the other pool.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::L2Advertisement;
use crate::address::{AddressRange, parse_range};
use crate::pool::{IPAddressPool, MAX_ADDRESSES};
use crate::selector;

/// The condition type a problem is reported under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProblemKind {
    /// The pool's own spec is wrong.
    Invalid,
    /// The pool shares addresses with an older pool.
    Overlapping,
    /// A `fromNodeNetwork` pool whose addresses the speakers have not resolved (yet).
    Unresolved,
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::Invalid => "Invalid",
            ProblemKind::Overlapping => "Overlapping",
            ProblemKind::Unresolved => "Unresolved",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    /// A sentence naming the pool and the field, ready for a condition or a log line.
    pub message: String,
}

impl Problem {
    fn invalid(message: String) -> Problem {
        Problem {
            kind: ProblemKind::Invalid,
            message,
        }
    }
}

/// One pool after checking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckedPool {
    pub name: String,
    /// Every entry that parses, sorted; overlapping entries are kept as written.
    pub ranges: Vec<AddressRange>,
    pub problems: Vec<Problem>,
}

impl CheckedPool {
    /// Whether new addresses may be handed out from this pool.
    pub fn usable(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks one pool on its own.
pub fn check_pool(pool: &IPAddressPool) -> CheckedPool {
    let name = pool.metadata.name.clone().unwrap_or_default();
    let mut problems = Vec::new();
    let (field, entries) = pool.entries();
    match &pool.spec.from_node_network {
        Some(_) if !pool.spec.addresses.is_empty() => problems.push(Problem::invalid(format!(
            "pool {name:?}: spec.addresses and spec.fromNodeNetwork are both set; keep one"
        ))),
        Some(f) if f.count().is_none() => problems.push(Problem::invalid(format!(
            "pool {name:?}: spec.fromNodeNetwork.size {} is not between 1 and {}",
            f.size,
            crate::pool::MAX_FROM_NODE_NETWORK
        ))),
        Some(_) if entries.is_empty() => {
            let why = match pool.node_network().and_then(|n| n.problem.as_deref()) {
                Some(problem) => format!("cannot be resolved: {problem}"),
                None => "is not resolved yet: no speaker has written status.nodeNetwork (one does once an L2Advertisement announces the pool)".to_string(),
            };
            problems.push(Problem {
                kind: ProblemKind::Unresolved,
                message: format!("pool {name:?}: spec.fromNodeNetwork {why}"),
            });
        }
        Some(_) => {}
        None if entries.is_empty() => problems.push(Problem::invalid(format!(
            "pool {name:?}: spec.addresses is empty; list at least one CIDR, range or IP, or set spec.fromNodeNetwork"
        ))),
        None => {}
    }
    let mut invalid = |message: String| {
        problems.push(Problem {
            kind: ProblemKind::Invalid,
            message,
        })
    };
    if entries.len() > MAX_ADDRESSES {
        invalid(format!(
            "pool {name:?}: {field} has {} entries, more than the {MAX_ADDRESSES} the API server accepts; use wider CIDRs or ranges",
            entries.len()
        ));
    }
    let mut parsed: Vec<(usize, AddressRange)> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match parse_range(&entry.0) {
            Ok(range) => {
                if let Some((j, _, common)) = parsed
                    .iter()
                    .find_map(|(j, r)| r.intersection(&range).map(|c| (*j, *r, c)))
                {
                    invalid(format!(
                        "pool {name:?}: {field}[{i}] {:?} overlaps {field}[{j}] {:?} at {common}",
                        entry.0, entries[j].0
                    ));
                }
                parsed.push((i, range));
            }
            Err(e) => invalid(format!("pool {name:?}: {field}[{i}]: {e}")),
        }
    }
    if let Some(alloc) = &pool.spec.service_allocation {
        let mut check_selectors = |field: &str, selectors: &[LabelSelector]| {
            for (i, s) in selectors.iter().enumerate() {
                if let Err(e) = selector::validate(s) {
                    invalid(format!(
                        "pool {name:?}: spec.serviceAllocation.{field}[{i}].{e}"
                    ));
                }
            }
        };
        check_selectors("namespaceSelectors", &alloc.namespace_selectors);
        check_selectors("serviceSelectors", &alloc.service_selectors);
    }
    let mut ranges: Vec<AddressRange> = parsed.into_iter().map(|(_, r)| r).collect();
    ranges.sort();
    CheckedPool {
        name,
        ranges,
        problems,
    }
}

/// The first repeat in a list the CRD declares a set, or whose items must be unique
/// (`spec.serviceAllocation.namespaces[2] "shop" repeats namespaces[0]`): the API server
/// refuses such a pool, as MetalLB's does, so files read by `plan`, `why -f` and
/// `import` are refused the same way instead of planning with an object that could
/// never be applied.
pub fn pool_repeats(pool: &IPAddressPool) -> Option<String> {
    let alloc = pool.spec.service_allocation.as_ref()?;
    repeat("spec.serviceAllocation.namespaces", &alloc.namespaces)
        .or_else(|| {
            repeat(
                "spec.serviceAllocation.namespaceSelectors",
                &alloc.namespace_selectors,
            )
        })
        .or_else(|| {
            repeat(
                "spec.serviceAllocation.serviceSelectors",
                &alloc.service_selectors,
            )
        })
}

/// [`pool_repeats`] for an L2Advertisement's lists, and its `gratuitous` bounds: what
/// the API server refuses in an L2Advertisement.
pub fn advertisement_problem(advertisement: &L2Advertisement) -> Option<String> {
    let spec = &advertisement.spec;
    repeat("spec.ipAddressPools", &spec.ip_address_pools)
        .or_else(|| {
            repeat(
                "spec.ipAddressPoolSelectors",
                &spec.ip_address_pool_selectors,
            )
        })
        .or_else(|| repeat("spec.nodeSelectors", &spec.node_selectors))
        .or_else(|| repeat("spec.interfaces", &spec.interfaces))
        .or_else(|| spec.gratuitous.as_ref().and_then(|g| g.problem()))
        .or_else(|| {
            use crate::l2advertisement::{PRIORITY_MAX, PRIORITY_MIN};
            spec.node_priorities.iter().enumerate().find_map(|(i, p)| {
                (!(PRIORITY_MIN..=PRIORITY_MAX).contains(&p.priority)).then(|| {
                    format!(
                        "spec.nodePriorities[{i}].priority {} is out of {PRIORITY_MIN}..={PRIORITY_MAX}",
                        p.priority
                    )
                })
            })
        })
}

fn repeat<T: PartialEq + Shown>(field: &str, items: &[T]) -> Option<String> {
    items.iter().enumerate().find_map(|(i, item)| {
        let first = items[..i].iter().position(|x| x == item)?;
        let list = field.rsplit('.').next().unwrap_or(field);
        Some(format!(
            "{field}[{i}]{} repeats {list}[{first}]; the API server refuses a list with repeats: remove one",
            item.shown()
        ))
    })
}

/// How a repeated item is named in the message: a name quoted, a selector not at all
/// (its index says which).
trait Shown {
    fn shown(&self) -> String;
}

impl Shown for String {
    fn shown(&self) -> String {
        format!(" {self:?}")
    }
}

impl Shown for LabelSelector {
    fn shown(&self) -> String {
        String::new()
    }
}

/// Checks every pool, then marks overlaps between them.
///
/// When two pools overlap, the older one (by `metadata.creationTimestamp`, then by
/// name) keeps working and the newer one is marked Overlapping, so that adding a bad
/// pool never breaks one that was serving. Pools are returned sorted by name.
pub fn check_pools(pools: &[IPAddressPool]) -> Vec<CheckedPool> {
    let mut order: Vec<&IPAddressPool> = pools.iter().collect();
    order.sort_by(|a, b| {
        let key = |p: &IPAddressPool| {
            (
                p.metadata.creation_timestamp.clone(),
                p.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    // Entries of pools accepted so far, with where they came from.
    let mut accepted: Vec<(AddressRange, &str, &str, usize, &str)> = Vec::new();
    let mut checked: Vec<CheckedPool> = Vec::with_capacity(pools.len());
    for pool in order {
        let mut c = check_pool(pool);
        let mut own: Vec<(AddressRange, &str, &str, usize, &str)> = Vec::new();
        let (field, entries) = pool.entries();
        for (i, entry) in entries.iter().enumerate() {
            let Ok(range) = parse_range(&entry.0) else {
                continue;
            };
            for (other, other_pool, other_field, j, other_entry) in &accepted {
                if let Some(common) = other.intersection(&range) {
                    c.problems.push(Problem {
                        kind: ProblemKind::Overlapping,
                        message: format!(
                            "pool {:?}: {field}[{i}] {:?} overlaps pool {other_pool:?} {other_field}[{j}] {other_entry:?} at {common}",
                            c.name, entry.0
                        ),
                    });
                }
            }
            own.push((
                range,
                pool.metadata.name.as_deref().unwrap_or_default(),
                field,
                i,
                &entry.0,
            ));
        }
        if c.usable() {
            accepted.extend(own);
        }
        checked.push(c);
    }
    checked.sort_by(|a, b| a.name.cmp(&b.name));
    checked
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::IPAddressPoolSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn pool(name: &str, addresses: &[&str]) -> IPAddressPool {
        IPAddressPool::new(
            name,
            IPAddressPoolSpec {
                addresses: addresses.iter().map(|a| (*a).into()).collect(),
                ..Default::default()
            },
        )
    }

    fn created(mut p: IPAddressPool, secs: i64) -> IPAddressPool {
        p.metadata.creation_timestamp = Some(Time(Timestamp::from_second(secs).unwrap()));
        p
    }

    #[test]
    fn a_good_pool_has_no_problems() {
        let c = check_pool(&pool(
            "a",
            &["10.0.0.0/24", "fd00::/120", "10.0.1.1-10.0.1.9"],
        ));
        assert!(c.usable(), "{:?}", c.problems);
        assert_eq!(c.ranges.len(), 3);
    }

    #[test]
    fn bad_entry_names_pool_index_and_text_and_keeps_the_rest() {
        let c = check_pool(&pool("lab", &["10.0.0.0/24", "10.0.1.5/24"]));
        assert!(!c.usable());
        let msg = &c.problems[0].message;
        assert!(msg.contains("pool \"lab\": spec.addresses[1]"), "{msg}");
        assert!(msg.contains("did you mean \"10.0.1.0/24\""), "{msg}");
        assert_eq!(c.ranges.len(), 1, "the parseable entry is kept");
    }

    #[test]
    fn more_entries_than_the_crd_allows_is_invalid() {
        let entries: Vec<String> = (0..=MAX_ADDRESSES)
            .map(|i| format!("10.0.{}.{}", i / 256, i % 256))
            .collect();
        let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
        let c = check_pool(&pool("many", &entries));
        assert_eq!(
            c.problems[0].message,
            "pool \"many\": spec.addresses has 257 entries, more than the 256 the API server accepts; use wider CIDRs or ranges"
        );
    }

    #[test]
    fn overlap_inside_one_pool_is_invalid() {
        let c = check_pool(&pool("a", &["10.0.0.0/24", "10.0.0.128-10.0.1.3"]));
        assert_eq!(c.problems.len(), 1);
        assert!(
            c.problems[0].message.contains("at 10.0.0.128-10.0.0.255"),
            "{:?}",
            c.problems
        );
    }

    #[test]
    fn newer_overlapping_pool_is_marked_and_older_keeps_working() {
        let old = created(pool("zeta", &["10.0.0.0/24"]), 100);
        let new = created(pool("alpha", &["10.0.0.200-10.0.1.10"]), 200);
        let checked = check_pools(&[new, old]);
        let alpha = &checked[0];
        let zeta = &checked[1];
        assert!(zeta.usable());
        assert_eq!(alpha.problems[0].kind, ProblemKind::Overlapping);
        let msg = &alpha.problems[0].message;
        assert!(
            msg.contains("pool \"alpha\"") && msg.contains("pool \"zeta\""),
            "{msg}"
        );
        assert!(msg.contains("at 10.0.0.200-10.0.0.255"), "{msg}");
    }

    #[test]
    fn without_timestamps_the_name_decides() {
        let checked = check_pools(&[pool("b", &["fd00::/64"]), pool("a", &["fd00::1"])]);
        assert!(checked[0].usable());
        assert!(!checked[1].usable());
    }

    #[test]
    fn broken_selector_is_named() {
        use crate::pool::ServiceAllocation;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
        let mut p = pool("a", &["10.0.0.0/24"]);
        p.spec.service_allocation = Some(ServiceAllocation {
            namespace_selectors: vec![LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: "team".into(),
                    operator: "Equals".into(),
                    values: None,
                }]),
                ..Default::default()
            }],
            ..Default::default()
        });
        let c = check_pool(&p);
        let msg = &c.problems[0].message;
        assert!(
            msg.contains("spec.serviceAllocation.namespaceSelectors[0].matchExpressions[0]: unknown operator \"Equals\""),
            "{msg}"
        );
    }

    fn from_node_network(name: &str, resolved: Option<crate::NodeNetworkStatus>) -> IPAddressPool {
        let mut p = IPAddressPool::new(
            name,
            IPAddressPoolSpec {
                from_node_network: Some(crate::FromNodeNetwork {
                    size: 4,
                    families: vec![],
                }),
                ..Default::default()
            },
        );
        p.status = resolved.map(|n| crate::IPAddressPoolStatus {
            node_network: Some(n),
            ..Default::default()
        });
        p
    }

    #[test]
    fn a_from_node_network_pool_is_unresolved_until_its_status_has_addresses() {
        let c = check_pool(&from_node_network("auto", None));
        assert_eq!(c.problems.len(), 1);
        assert_eq!(c.problems[0].kind, ProblemKind::Unresolved);
        assert!(
            c.problems[0]
                .message
                .starts_with("pool \"auto\": spec.fromNodeNetwork is not resolved yet"),
            "{:?}",
            c.problems
        );
        let c = check_pool(&from_node_network(
            "auto",
            Some(crate::NodeNetworkStatus {
                problem: Some("the nodes do not share one IPv4 subnet".into()),
                ..Default::default()
            }),
        ));
        assert_eq!(
            c.problems[0].message,
            "pool \"auto\": spec.fromNodeNetwork cannot be resolved: the nodes do not share one IPv4 subnet"
        );
        let c = check_pool(&from_node_network(
            "auto",
            Some(crate::NodeNetworkStatus {
                addresses: vec!["10.99.0.251-10.99.0.254".into(), "fd99::1".into()],
                ..Default::default()
            }),
        ));
        assert!(c.usable(), "{:?}", c.problems);
        assert_eq!(c.ranges.len(), 2);
        // Resolved addresses overlapping an older pool are reported under their field.
        let old = created(pool("old", &["10.99.0.254"]), 1);
        let auto = created(
            from_node_network(
                "auto",
                Some(crate::NodeNetworkStatus {
                    addresses: vec!["10.99.0.251-10.99.0.254".into()],
                    ..Default::default()
                }),
            ),
            2,
        );
        let checked = check_pools(&[old, auto]);
        assert!(
            checked[0].problems[0]
                .message
                .contains("status.nodeNetwork.addresses[0] \"10.99.0.251-10.99.0.254\" overlaps pool \"old\" spec.addresses[0]"),
            "{:?}",
            checked[0].problems
        );
        // Both sources set: invalid, whatever the status says.
        let mut both = from_node_network("both", None);
        both.spec.addresses = vec!["10.0.0.1".into()];
        let c = check_pool(&both);
        assert_eq!(c.problems[0].kind, ProblemKind::Invalid);
        assert!(
            c.problems[0].message.contains("both set"),
            "{:?}",
            c.problems
        );
    }
}
