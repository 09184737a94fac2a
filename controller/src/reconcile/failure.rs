//! Why allocation failed, as the label of the allocation-failure metric: a handful of
//! kinds an operator can alert on, where the Event keeps the full sentence.

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
