//! Why allocation failed, as the label of the allocation-failure metric: a handful of
//! kinds an operator can alert on, where the Event keeps the full sentence.
//!
//! The kind is read from the allocator's sentence, because `Outcome::Pending` carries
//! nothing else: the allocator's wording and the words matched here change together, and
//! a name holding one of them (a pool called `exhausted-…`) can mislead the match. Giving
//! `Outcome::Pending` a typed kind would fix that, at the cost of a field every caller
//! that matches it (`plan`, `why`, the speaker) must follow.

/// A metric label for why allocation failed.
fn failure_kind(reason: &str) -> &'static str {
    if reason.contains("exhausted") {
        "exhausted"
    } else if reason.contains("requested") {
        "requested_unavailable"
    } else if reason.contains("no IPAddressPool exists")
        || reason.contains("pool is open")
        || reason.contains("no pool has")
        || reason.contains("does not exist")
    {
        "no_pool"
    } else if reason.contains("RequireDualStack") {
        "dual_stack"
    } else {
        "other"
    }
}

/// The label for an AllocationFailed Event: `invalid_service` when the Service's own
/// request cannot be honoured, else the kind of the allocator's `reason`.
pub(super) fn label(invalid_service: bool, reason: &str) -> &'static str {
    if invalid_service {
        "invalid_service"
    } else {
        failure_kind(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allocator's sentences as it writes them, and the label each gets.
    #[test]
    fn each_allocator_reason_gets_its_label() {
        for (reason, kind) in [
            ("pool \"a\" is exhausted", "exhausted"),
            ("pools \"a\", \"b\" are exhausted", "exhausted"),
            ("requested 10.0.0.1 is in no pool", "requested_unavailable"),
            ("no IPAddressPool exists", "no_pool"),
            (
                "no IPv4 pool is open to this Service: pool \"a\" has autoAssign false",
                "no_pool",
            ),
            ("no pool has IPv6 addresses", "no_pool"),
            (
                "pool \"x\" (annotation ferrolb.io/address-pool) does not exist",
                "no_pool",
            ),
            (
                "RequireDualStack needs two families but spec.ipFamilies lists only IPv4",
                "dual_stack",
            ),
            (
                "RequireDualStack needs both families: pool \"a\" is exhausted",
                "exhausted",
            ),
        ] {
            assert_eq!(label(false, reason), kind, "{reason}");
        }
        assert_eq!(label(true, "pool \"a\" is exhausted"), "invalid_service");
    }
}
