//! Which namespace ferrolb runs in: the controller's Lease and the nodes' records live
//! there.

/// Where a Pod finds its own namespace.
const POD_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// `given` (a flag or $POD_NAMESPACE), else the Pod's own namespace, else "default".
pub fn own(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        std::fs::read_to_string(POD_NAMESPACE_FILE)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "default".into())
    })
}
