//! The controller in a cluster: watches in, [`Reconciler`] in the middle, writes out.
//!
//! Thin on purpose: every decision is the reconciler's. This module only
//! * elects one active replica through a `coordination.k8s.io` Lease ([`leader`]);
//! * while active, watches Services of type LoadBalancer, IPAddressPools and Namespaces
//!   ([`watch`]) and starts the reconciler once all three have listed;
//! * watches the nodes' NodeAnnouncements in ferrolb's namespace and feeds them, with the
//!   Services, to [`Announced`], which decides each Service's announced condition;
//! * carries out the reconciler's actions with retries ([`writes`]);
//! * serves `/metrics`, `/healthz` and `/readyz` ([`http`]).
//!
//! A replica that becomes active lists everything afresh before its first write, so it
//! adopts what the previous one wrote; one that stops being active stops writing at once.

mod leader;
pub mod metrics;
mod watch;
mod writes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use tokio::sync::watch as channel;
use tracing::{Instrument, info, warn};

use crate::announced::Announced;
use crate::reconcile::{Action, Reconciler};
use ferrolb_allocator::ServiceKey;
pub use leader::LeaseOptions;
use metrics::Metrics;
use watch::{Change, Mirror, Resource};

/// How `ferrolb controller` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `spec.loadBalancerClass` served besides none.
    pub class: String,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_address: SocketAddr,
    /// `None`: always active (a single replica, or tests).
    pub lease: Option<LeaseOptions>,
    /// This replica's name in Events and the Lease (the Pod name in a cluster).
    pub identity: String,
    /// ferrolb's namespace, where the nodes' NodeAnnouncements are.
    pub namespace: String,
}

/// What `/readyz` and `/healthz` report.
#[derive(Debug, Default)]
pub struct Health {
    /// Active and every watch has listed.
    pub synced: AtomicBool,
    /// Standing by for the Lease (ready to take over).
    pub standby: AtomicBool,
    /// The last error of each watch, cleared by its next event.
    pub watch_errors: std::sync::Mutex<BTreeMap<&'static str, String>>,
}

impl Health {
    pub fn ready(&self) -> Result<(), String> {
        let errors = self.watch_errors.lock().unwrap_or_else(|e| e.into_inner());
        if !errors.is_empty() {
            let lines: Vec<String> = errors.iter().map(|(r, e)| format!("{r}: {e}")).collect();
            return Err(format!("watch failing: {}", lines.join("; ")));
        }
        if self.synced.load(Ordering::Relaxed) || self.standby.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("watches have not listed yet".into())
        }
    }
}

/// Runs until SIGTERM or SIGINT, then releases the Lease and returns.
pub async fn run(client: Client, options: Options) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::default());
    let render = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.encode())
    };
    let ready = {
        let health = health.clone();
        Arc::new(move || health.ready())
    };
    let server = ferrolb_kubernetes::http::serve(options.metrics_address, render, ready)
        .await
        .with_context(|| format!("serving metrics on {}", options.metrics_address))?;
    info!(address = %server, "serving /metrics, /healthz and /readyz");
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    let Some(lease) = &options.lease else {
        tokio::select! {
            result = active(client, &options, &metrics, &health, None) => result?,
            _ = &mut shutdown => info!("shutting down"),
        }
        return Ok(());
    };
    let (mut leading, lease_task) = leader::elect(client.clone(), lease, &options.identity).await?;
    loop {
        health.standby.store(true, Ordering::Relaxed);
        metrics.leader.set(0);
        tokio::select! {
            _ = &mut shutdown => break,
            changed = leading.wait_for(|l| *l) => {
                if changed.is_err() {
                    anyhow::bail!("the Lease task stopped");
                }
            }
        }
        info!(lease = %lease.name, "became the active controller");
        health.standby.store(false, Ordering::Relaxed);
        metrics.leader.set(1);
        let result = tokio::select! {
            r = active(client.clone(), &options, &metrics, &health, Some(leading.clone())) => r,
            _ = &mut shutdown => break,
        };
        // A standby reports nothing of the watches or addresses it no longer has.
        health.synced.store(false, Ordering::Relaxed);
        health
            .watch_errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        metrics.clear_active();
        if let Err(e) = result {
            warn!("stopped acting: {e:#}");
        }
        if *leading.borrow() {
            // Stopped by the Lease watch while the Lease task still says we lead: it
            // learns of the loss at its next renewal. Wait for that rather than start
            // again (listing everything) only to stop again.
            let renewal = Duration::from_secs(lease.duration);
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::timeout(renewal, leading.wait_for(|l| !*l)) => {}
            }
        }
    }
    info!("shutting down: releasing the Lease");
    metrics.leader.set(0);
    drop(leading);
    // The Lease task releases the Lease once nobody listens to it.
    let _ = tokio::time::timeout(Duration::from_secs(5), lease_task).await;
    Ok(())
}

/// The active controller: returns when leadership is lost.
async fn active(
    client: Client,
    options: &Options,
    metrics: &Metrics,
    health: &Health,
    mut leading: Option<channel::Receiver<bool>>,
) -> Result<()> {
    let mut reconciler = Reconciler::new(&options.class);
    // Services go straight into the reconciler, listed or not, so they are never held
    // here; pools and namespaces are few, and each change needs all of them.
    let mut services: Mirror<ServiceKey, k8s_openapi::api::core::v1::Service> = Mirror::keys_only();
    let mut pools: Mirror<String, ferrolb_api::IPAddressPool> = Mirror::keeping();
    let mut namespaces: Mirror<String, k8s_openapi::api::core::v1::Namespace> = Mirror::keeping();
    // The nodes' records go straight into `announced` too.
    let mut announced = Announced::default();
    let mut records: Mirror<String, ferrolb_api::NodeAnnouncement> = Mirror::keys_only();
    let mut changes = watch::changes(client.clone(), &options.namespace);
    let fence_client = client.clone();
    let writer = writes::Writer::new(client, &options.identity, metrics);
    let mut retries = writes::Retrying::default();
    let mut pool_flush = tokio::time::interval(Duration::from_millis(250));
    pool_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // Resolves when this replica must stop acting: the Lease task says it lost the
    // Lease, or the Lease itself, watched, names another holder or has expired.
    let lost = async {
        let Some(l) = leading.as_mut() else {
            return std::future::pending().await;
        };
        let lease = options.lease.clone().expect("leading comes with a Lease");
        tokio::select! {
            _ = l.wait_for(|l| !*l) => {}
            why = leader::lost(fence_client, lease, options.identity.clone()) => warn!("stopping: {why}"),
        }
    };
    tokio::pin!(lost);
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            biased;
            _ = &mut lost => return Ok(()),
            change = changes.next() => match change {
                Some(c) => batch.push(c),
                None => anyhow::bail!("the watches ended"),
            },
            key = retries.services.next() => {
                let actions = reconciler.resync(&key);
                if !actions.iter().any(|a| matches!(a, Action::ServiceStatus { .. } | Action::Event(_))) {
                    // Nothing left to write for it (deleted, or the watch caught up).
                    retries.services.succeeded(&key);
                }
                tokio::select! {
                    biased;
                    _ = &mut lost => return Ok(()),
                    _ = writer.carry_out(actions, &mut reconciler, &mut retries) => {}
                }
                continue;
            }
            key = retries.conditions.next() => {
                let writes = announced.resync(&key);
                if writes.is_empty() {
                    retries.conditions.succeeded(&key);
                }
                tokio::select! {
                    biased;
                    _ = &mut lost => return Ok(()),
                    _ = writer.announce(writes, &mut announced, &mut retries) => {}
                }
                continue;
            }
            _ = pool_flush.tick() => {
                let now = Time(Timestamp::now());
                let mut actions = reconciler.pool_statuses(&now, &announced.taken());
                actions.retain(|a| !matches!(a, Action::PoolStatus { name, .. } if retries.pools.waiting(name)));
                tokio::select! {
                    biased;
                    _ = &mut lost => return Ok(()),
                    _ = writer.carry_out(actions, &mut reconciler, &mut retries) => {}
                }
                continue;
            }
        }
        // Take whatever else is already waiting, to decide it in one go.
        while batch.len() < 1000 {
            match futures::FutureExt::now_or_never(changes.next()) {
                Some(Some(c)) => batch.push(c),
                _ => break,
            }
        }
        let started = Instant::now();
        let mut actions: Vec<Action> = Vec::new();
        let mut conditions = Vec::new();
        let mut trigger = "services";
        for change in batch {
            match change {
                Change::Error(resource, message) => {
                    health
                        .watch_errors
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(resource.name(), message);
                }
                Change::Service(event) => {
                    watch::clear_error(health, Resource::Services);
                    for step in services.apply(*event, ferrolb_allocator::input::service_key) {
                        // Before start this only records the Service.
                        actions.extend(match step {
                            watch::Step::Deleted(key) => {
                                announced.service_deleted(&key);
                                reconciler.service_deleted(&key)
                            }
                            watch::Step::Applied(svc) => {
                                conditions.extend(announced.service_applied(&svc));
                                reconciler.service_applied(&svc)
                            }
                        });
                    }
                }
                Change::Pool(event) => {
                    watch::clear_error(health, Resource::Pools);
                    if !pools
                        .apply(*event, |p| p.metadata.name.clone().unwrap_or_default())
                        .is_empty()
                        && reconciler.is_started()
                    {
                        trigger = "pools";
                        actions.extend(reconciler.pools_applied(&pools.objects()));
                    }
                }
                Change::Record(event) => {
                    watch::clear_error(health, Resource::Records);
                    for step in
                        records.apply(*event, |r| r.metadata.name.clone().unwrap_or_default())
                    {
                        conditions.extend(match step {
                            watch::Step::Deleted(node) => announced.record_deleted(&node),
                            watch::Step::Applied(record) => announced.record_applied(&record),
                        });
                    }
                }
                Change::Namespace(event) => {
                    watch::clear_error(health, Resource::Namespaces);
                    if !namespaces
                        .apply(*event, |n| n.metadata.name.clone().unwrap_or_default())
                        .is_empty()
                        && reconciler.is_started()
                    {
                        trigger = "namespaces";
                        actions.extend(reconciler.namespaces_applied(&namespaces.objects()));
                    }
                }
            }
        }
        if !announced.is_started() && services.listed() && records.listed() {
            conditions = announced.start();
        }
        if !reconciler.is_started() {
            if !(services.listed() && pools.listed() && namespaces.listed()) {
                tokio::select! {
                    biased;
                    _ = &mut lost => return Ok(()),
                    _ = writer.announce(conditions, &mut announced, &mut retries) => {}
                }
                continue;
            }
            trigger = "start";
            actions = reconciler.start(&pools.objects(), &namespaces.objects(), &[]);
            health.synced.store(true, Ordering::Relaxed);
            info!(
                services = services.len(),
                pools = pools.len(),
                "watches listed; adopted every IP in status"
            );
        }
        metrics
            .reconcile_duration
            .observe(started.elapsed().as_secs_f64());
        Metrics::count(&metrics.reconciles, trigger);
        // Each batch's writes and their log lines under one span naming what set it off.
        let span = tracing::info_span!("reconcile", trigger);
        tokio::select! {
            biased;
            _ = &mut lost => return Ok(()),
            _ = async {
                writer.carry_out(actions, &mut reconciler, &mut retries).await;
                writer.announce(conditions, &mut announced, &mut retries).await;
            }.instrument(span) => {}
        }
        metrics.set_usage(&reconciler.usage());
        let (pending, stranded) = reconciler.counts();
        metrics.pending_services.set(pending as i64);
        metrics.stranded_services.set(stranded as i64);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
