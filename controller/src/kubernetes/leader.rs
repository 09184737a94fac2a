//! One active controller among the replicas, through a `coordination.k8s.io` Lease
//! (kube-lease-manager).
//!
//! The holder renews the Lease `grace` seconds before it expires; a standby takes it
//! once it has expired (a holder that dies without releasing it) or at once (a holder
//! that shut down and released it). The defaults, 6 s and 2 s, hand over within about
//! 7 s of a crash and cost one write every 4 s.

use anyhow::{Context, Result};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Debug)]
pub struct LeaseOptions {
    pub name: String,
    pub namespace: String,
    /// Seconds a Lease stays valid after its last renewal.
    pub duration: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace: u64,
}

/// Starts competing for the Lease; the receiver says whether this replica holds it.
/// Dropping every receiver releases the Lease (the task then ends).
pub async fn elect(
    client: Client,
    options: &LeaseOptions,
    identity: &str,
) -> Result<(watch::Receiver<bool>, JoinHandle<()>)> {
    anyhow::ensure!(
        options.grace < options.duration,
        "--lease-grace ({}) must be shorter than --lease-duration ({})",
        options.grace,
        options.duration
    );
    let manager = LeaseManagerBuilder::new(client, &options.name)
        .with_namespace(&options.namespace)
        .with_identity(identity)
        .with_duration(options.duration)
        .with_grace(options.grace)
        .with_field_manager("ferrolb-controller")
        .build()
        .await
        .with_context(|| {
            format!(
                "using Lease {}/{} (the controller needs get, create and patch on leases there)",
                options.namespace, options.name
            )
        })?;
    let (receiver, task) = manager.watch().await;
    let task = tokio::spawn(async move {
        if let Ok(Err(e)) = task.await {
            tracing::warn!("releasing the Lease: {e}");
        }
    });
    Ok((receiver, task))
}
