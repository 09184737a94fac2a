//! Writing a `fromNodeNetwork` pool's resolution to its `status.nodeNetwork`.
//!
//! The addresses never change once written: the write is conditional on the pool's
//! resourceVersion in the newest snapshot, and skipped when that snapshot already holds
//! addresses (another speaker was faster) or the very same status.

use std::sync::Arc;

use ferrolb_api::IPAddressPool;
use ferrolb_api::manifests::Manifests;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Error};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::daemon::Resolved;

/// Writes tried per resolution: a conflict (the controller wrote the pool's conditions
/// meanwhile) is retried on the next snapshot.
const ATTEMPTS: usize = 5;

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
        let body = json!({
            "metadata": {"resourceVersion": pool.object.metadata.resource_version},
            "status": {"nodeNetwork": resolved.status},
        });
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(body))
            .await
        {
            Ok(_) => {
                info!(pool = %name, "wrote status.nodeNetwork");
                return;
            }
            Err(Error::Api(e)) if e.code == 409 => {
                if snapshots.changed().await.is_err() {
                    return;
                }
            }
            Err(e) => {
                warn!(pool = %name, "cannot write status.nodeNetwork (ipaddresspools/status patch): {e}");
                return;
            }
        }
    }
}
