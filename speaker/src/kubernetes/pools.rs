//! Writing a `fromNodeNetwork` pool's resolution to its `status.nodeNetwork`.
//!
//! The addresses never change once written: the write is conditional on the pool's
//! resourceVersion in the newest snapshot, and skipped when that snapshot already holds
//! addresses (another speaker was faster) or the very same status.

use std::sync::Arc;

use ferrolb_api::manifests::Manifests;
use ferrolb_api::{IPAddressPool, NodeNetworkStatus};
use ferrolb_kubernetes::error::ApiError;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::daemon::Resolved;

/// Writes tried per resolution: a conflict (the controller wrote the pool's conditions
/// meanwhile) is retried on the next snapshot.
const ATTEMPTS: usize = 5;

/// The merge patch: conditional on `resource_version`, and with every field the new
/// status leaves out set to null, so that a problem written earlier does not linger
/// beside the addresses (a merge patch keeps what it does not name).
fn patch_body(resource_version: Option<&str>, status: &NodeNetworkStatus) -> Value {
    let mut node_network = json!(status);
    if let Value::Object(fields) = &mut node_network {
        for key in ["addresses", "subnets", "skipped", "resolvedBy", "problem"] {
            fields.entry(key).or_insert(Value::Null);
        }
    }
    json!({
        "metadata": {"resourceVersion": resource_version},
        "status": {"nodeNetwork": node_network},
    })
}

pub async fn write(
    client: Client,
    mut snapshots: watch::Receiver<Arc<Manifests>>,
    resolved: Resolved,
) {
    let api: Api<IPAddressPool> = Api::all(client);
    let name = resolved.pool.as_str();
    for _ in 0..ATTEMPTS {
        let current = snapshots.borrow_and_update().clone();
        let Some(pool) = current
            .pools
            .iter()
            .find(|p| p.object.metadata.name.as_deref() == Some(name))
        else {
            return;
        };
        let before = pool.object.node_network();
        if before.is_some_and(|n| !n.addresses.is_empty()) || before == Some(&resolved.status) {
            return;
        }
        let body = patch_body(
            pool.object.metadata.resource_version.as_deref(),
            &resolved.status,
        );
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(body))
            .await
        {
            Ok(_) => {
                info!(pool = %name, "wrote status.nodeNetwork");
                return;
            }
            Err(e) if matches!(ApiError::from_kube(&e), ApiError::Conflict { .. }) => {
                if snapshots.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let error = ApiError::from_kube(&e);
                warn!(pool = %name, "cannot write status.nodeNetwork: {}", error.explain("speaker", "patch", "ipaddresspools/status"));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolving_after_a_problem_clears_the_problem() {
        let status = NodeNetworkStatus {
            addresses: vec!["10.99.0.251-10.99.0.254".into()],
            subnets: vec!["10.99.0.0/24".into()],
            resolved_by: "node1".into(),
            ..Default::default()
        };
        let body = patch_body(Some("7"), &status);
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        let written = &body["status"]["nodeNetwork"];
        assert_eq!(written["addresses"], json!(["10.99.0.251-10.99.0.254"]));
        assert_eq!(written["problem"], Value::Null);
        assert_eq!(written["skipped"], Value::Null);
        assert!(written.as_object().unwrap().contains_key("problem"));
        // Applied as a merge patch over an earlier problem, nothing of it is left.
        let mut before = json!({"nodeNetwork": {"problem": "the nodes do not share one IPv4 subnet", "resolvedBy": "node2"}});
        json_patch::merge(&mut before, &body["status"]);
        let after: NodeNetworkStatus =
            serde_json::from_value(before["nodeNetwork"].clone()).unwrap();
        assert_eq!(after, status);
    }
}
