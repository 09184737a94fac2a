//! One active controller among the replicas, through a `coordination.k8s.io` Lease
//! (kube-lease-manager).
//!
//! The holder renews the Lease `grace` seconds before it expires; a standby takes it
//! once it has expired (a holder that dies without releasing it) or at once (a holder
//! that shut down and released it). The defaults, 6 s and 2 s, hand over within about
//! 7 s of a crash and cost one write every 4 s.

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
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

/// Reads the Lease back: Ok while it names `identity` and has not expired, else why not.
/// An unreachable API server is no reason to stop (nobody else can take the Lease then,
/// and every write fails anyway).
pub async fn still_held(
    client: &Client,
    options: &LeaseOptions,
    identity: &str,
) -> Result<(), String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
    let lease = match leases.get(&options.name).await {
        Ok(lease) => lease,
        Err(kube::Error::Api(s)) => {
            return Err(format!(
                "reading Lease {}/{}: {}",
                options.namespace, options.name, s.message
            ));
        }
        Err(_) => return Ok(()),
    };
    let spec = lease.spec.unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(identity) {
        return Err(format!(
            "Lease {}/{} is held by {}",
            options.namespace,
            options.name,
            spec.holder_identity.as_deref().unwrap_or("nobody")
        ));
    }
    let expires = spec
        .renew_time
        .map(|t| t.0.as_second() + spec.lease_duration_seconds.unwrap_or(0) as i64);
    match expires {
        Some(at) if at < Timestamp::now().as_second() => Err(format!(
            "Lease {}/{} expired {} s ago without renewal",
            options.namespace,
            options.name,
            Timestamp::now().as_second() - at
        )),
        _ => Ok(()),
    }
}
