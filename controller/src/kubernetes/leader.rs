//! One active controller among the replicas, through a `coordination.k8s.io` Lease
//! (kube-lease-manager).
//!
//! The holder renews the Lease `grace` seconds before it expires; a standby takes it
//! once it has expired (a holder that dies without releasing it) or at once (a holder
//! that shut down and released it). The defaults, 15 s and 5 s (client-go's lease
//! duration), hand over within about 16 s of a crash and cost one write every 10 s. Only
//! new assignments wait for a handover: speakers keep announcing what is assigned.

use anyhow::{Context, Result};
use ferrolb_kubernetes::error::ApiError;
use ferrolb_kubernetes::lease::Holder;
use ferrolb_kubernetes::retry::Backoff;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::Client;
use kube::runtime::{WatchStreamExt, watcher};
use kube_lease_manager::LeaseManagerBuilder;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

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

/// Resolves, with the reason, once this replica must stop acting: the Lease, watched,
/// names another holder, or it went unrenewed past its expiry and reading it back
/// confirms that (the Lease task only logs failed renewals, so it alone could keep a
/// replica acting too long). Watching costs no request at rest: the Lease is read only
/// when a renewal is missing, or every `grace` seconds while the watch itself fails.
pub async fn lost(client: Client, options: LeaseOptions, identity: String) -> String {
    let api: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={}", options.name));
    let mut leases = watcher(api, config)
        .backoff(Backoff::default())
        .applied_objects()
        .boxed();
    let recheck = Duration::from_secs(options.grace.max(1));
    // Until the watch shows the Lease, as if a renewal were missing.
    let mut check_at = Instant::now() + Duration::from_secs(options.duration);
    let mut watch_failing = false;
    loop {
        tokio::select! {
            event = leases.next() => match event {
                Some(Ok(lease)) => {
                    watch_failing = false;
                    match validity(&lease, &options, &identity) {
                        // A second of margin for clocks and the renewal's own trip.
                        Ok(left) => {
                            let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
                            check_at = Instant::now() + left + Duration::from_secs(1);
                        }
                        Err(why) => return why,
                    }
                }
                Some(Err(e)) => {
                    if !watch_failing {
                        tracing::warn!(
                            "cannot watch Lease {}/{} ({e}); reading it every {} s instead (the controller needs list and watch on it)",
                            options.namespace,
                            options.name,
                            recheck.as_secs()
                        );
                    }
                    watch_failing = true;
                    check_at = check_at.min(Instant::now() + recheck);
                }
                None => return "the Lease watch ended".into(),
            },
            () = tokio::time::sleep_until(check_at) => {
                if let Err(why) = still_held(&client, &options, &identity).await {
                    return why;
                }
                check_at = Instant::now() + recheck;
            }
        }
    }
}

/// How long the Lease stays valid unless renewed (negative: expired that long ago; zero
/// without a renewal time); an error when it names another holder.
fn validity(
    lease: &Lease,
    options: &LeaseOptions,
    identity: &str,
) -> Result<SignedDuration, String> {
    let spec = lease.spec.as_ref().cloned().unwrap_or_default();
    match Holder::of(&spec, Timestamp::now()) {
        Some(h) if h.identity == identity => Ok(h.left()),
        other => Err(format!(
            "Lease {}/{} is held by {}",
            options.namespace,
            options.name,
            other.as_ref().map_or("nobody", |h| h.identity.as_str())
        )),
    }
}

/// Reads the Lease back: Ok while it names `identity` and has not expired, else why not.
/// An unreachable API server is no reason to stop (nobody else can take the Lease then,
/// and every write fails anyway).
async fn still_held(client: &Client, options: &LeaseOptions, identity: &str) -> Result<(), String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), &options.namespace);
    let lease = match leases.get(&options.name).await {
        Ok(lease) => lease,
        Err(e) => match ApiError::from_kube(&e) {
            ApiError::Transient { .. } => return Ok(()),
            error => {
                return Err(format!(
                    "reading Lease {}/{}: {}",
                    options.namespace,
                    options.name,
                    error.explain("controller", "get", "leases")
                ));
            }
        },
    };
    let left = validity(&lease, options, identity)?;
    if left.is_negative() {
        return Err(format!(
            "Lease {}/{} expired {} s ago without renewal",
            options.namespace,
            options.name,
            left.as_secs().unsigned_abs()
        ));
    }
    Ok(())
}
