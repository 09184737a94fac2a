//! Carrying out the reconciler's [`Action`]s, and retrying what fails.
//!
//! A Service's status is written with a JSON merge patch on its status subresource,
//! conditional on the resourceVersion the decision was made from: if the Service changed
//! meanwhile (a 409 Conflict), the write is retried from the newer object, so a decision
//! is never written over a change it did not see. Failed writes are retried with
//! exponential backoff (100 ms to 30 s); nothing is dropped but writes to deleted objects.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferrolb_api::{IPAddressPool, IPAddressPoolStatus};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::{debug, error, info, warn};

use super::metrics::Metrics;
use crate::reconcile::{self, Action, Reconciler, ServiceEvent};
use ferrolb_allocator::ServiceKey;
use ferrolb_kubernetes::events::Events;

/// The field manager of every write.
pub const FIELD_MANAGER: &str = "ferrolb-controller";
/// Writes in flight at once.
const CONCURRENCY: usize = 16;

pub struct Writer<'a> {
    client: Client,
    events: Events,
    metrics: &'a Metrics,
}

enum Done {
    Service(ServiceKey, Box<Result<Service, kube::Error>>),
    Pool(String, IPAddressPoolStatus, Result<(), kube::Error>),
    Event(ServiceKey, Result<(), kube::Error>),
}

impl<'a> Writer<'a> {
    pub fn new(client: Client, identity: &str, metrics: &'a Metrics) -> Writer<'a> {
        Writer {
            events: Events::new(client.clone(), FIELD_MANAGER, identity),
            client,
            metrics,
        }
    }

    /// Carries out `actions` (one Service's in order, different Services concurrently),
    /// tells the reconciler what was written, and schedules retries for what failed.
    pub async fn carry_out(
        &self,
        actions: Vec<Action>,
        reconciler: &mut Reconciler,
        retries: &mut Retries,
    ) {
        if actions.is_empty() {
            return;
        }
        // Group by Service so that a status write precedes the Event that tells of it.
        let mut groups: BTreeMap<Option<ServiceKey>, Vec<Action>> = BTreeMap::new();
        for action in actions {
            let key = match &action {
                Action::ServiceStatus { key, .. } => Some(key.clone()),
                Action::Event(e) => Some(e.key.clone()),
                Action::PoolStatus { .. } => None,
            };
            groups.entry(key).or_default().push(action);
        }
        let results: Vec<Vec<Done>> = futures::stream::iter(groups.into_values())
            .map(|group| async move {
                let mut done = Vec::new();
                for action in group {
                    let result = self.write(action).await;
                    let failed = matches!(&result, Done::Service(_, r) if r.is_err());
                    done.push(result);
                    if failed {
                        // The Event would tell of a write that did not happen.
                        break;
                    }
                }
                done
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        for done in results.into_iter().flatten() {
            match done {
                Done::Service(key, result) => match *result {
                    Ok(svc) => {
                        retries.succeeded(&key);
                        reconciler.service_written(&svc);
                    }
                    Err(e) => match &e {
                        kube::Error::Api(s) if s.code == 404 => {
                            debug!(service = %key, "not written: the Service is gone");
                        }
                        kube::Error::Api(s) if s.code == 409 => {
                            debug!(service = %key, "the Service changed meanwhile; deciding again");
                            reconciler.write_failed(&key);
                            retries.schedule(key, true);
                        }
                        _ => {
                            error!(service = %key, "cannot write status.loadBalancer: {}", explain(&e, "patch", "services/status"));
                            reconciler.write_failed(&key);
                            retries.schedule(key, false);
                        }
                    },
                },
                Done::Pool(name, status, Ok(())) => reconciler.pool_written(&name, status),
                Done::Pool(name, _, Err(e)) => {
                    // The next flush computes the status again and retries.
                    warn!(pool = %name, "cannot write the pool's status: {}", explain(&e, "patch", "ipaddresspools/status"));
                }
                Done::Event(_, Ok(())) => {}
                Done::Event(key, Err(e)) => {
                    warn!(service = %key, "cannot record an Event: {}", explain(&e, "create", "events"));
                    reconciler.write_failed(&key);
                    retries.schedule(key, false);
                }
            }
        }
    }

    async fn write(&self, action: Action) -> Done {
        match action {
            Action::ServiceStatus {
                key,
                ips,
                resource_version,
            } => {
                let result = self.service_status(&key, &ips, resource_version).await;
                match &result {
                    Ok(_) => {
                        Metrics::count(&self.metrics.writes, "service_status");
                        info!(service = %key, ips = ?ips, "wrote status.loadBalancer.ingress");
                    }
                    Err(e) => self.metrics.api_error("services/status", "patch", e),
                }
                Done::Service(key, Box::new(result))
            }
            Action::Event(event) => {
                let result = self.event(&event).await;
                match &result {
                    Ok(()) => Metrics::count(&self.metrics.writes, "event"),
                    Err(e) => self.metrics.api_error("events", "create", e),
                }
                if let Some(kind) = event.failure {
                    self.metrics
                        .allocation_failures
                        .get_or_create(&super::metrics::ReasonLabels {
                            reason: kind.to_string(),
                        })
                        .inc();
                }
                Done::Event(event.key, result)
            }
            Action::PoolStatus { name, status } => {
                let api: Api<IPAddressPool> = Api::all(self.client.clone());
                // status.nodeNetwork is the speakers' to write: left out, so a merge
                // patch from an older view never undoes what they resolved.
                let ours = IPAddressPoolStatus {
                    node_network: None,
                    ..status.clone()
                };
                let result = api
                    .patch_status(&name, &params(), &Patch::Merge(json!({ "status": ours })))
                    .await
                    .map(drop);
                match &result {
                    Ok(()) => Metrics::count(&self.metrics.writes, "pool_status"),
                    Err(e) => self.metrics.api_error("ipaddresspools/status", "patch", e),
                }
                Done::Pool(name, status, result)
            }
        }
    }

    async fn service_status(
        &self,
        key: &ServiceKey,
        ips: &[IpAddr],
        resource_version: Option<String>,
    ) -> Result<Service, kube::Error> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &key.namespace);
        let ingress = if ips.is_empty() {
            serde_json::Value::Null
        } else {
            ips.iter()
                .map(|ip| json!({ "ip": ip.to_string(), "ipMode": "VIP" }))
                .collect()
        };
        let mut patch = json!({ "status": { "loadBalancer": { "ingress": ingress } } });
        if let Some(rv) = resource_version {
            patch["metadata"] = json!({ "resourceVersion": rv });
        }
        api.patch_status(&key.name, &params(), &Patch::Merge(patch))
            .await
    }

    async fn event(&self, e: &ServiceEvent) -> Result<(), kube::Error> {
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(e.key.namespace.clone()),
            name: Some(e.key.name.clone()),
            uid: e.uid.clone(),
            ..Default::default()
        };
        let action = match e.reason {
            reconcile::IP_RELEASED => "Release",
            _ => "Allocate",
        };
        self.events
            .publish(reference, e.warning, e.reason, &e.message, action)
            .await
    }
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}

/// An API error with what to do about it, when that is known.
pub fn explain(e: &kube::Error, verb: &str, resource: &str) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "{}; the controller's ServiceAccount needs '{verb}' on {resource} (see docs/controller.md, RBAC)",
            s.message
        ),
        _ => e.to_string(),
    }
}

/// Services whose status write is to be tried again, each when its backoff ends.
#[derive(Default)]
pub struct Retries {
    /// When each is due; `None` once handed out, until scheduled again.
    due: BTreeMap<ServiceKey, Option<Instant>>,
    /// Failures in a row, for the backoff.
    attempts: BTreeMap<ServiceKey, u32>,
}

impl Retries {
    /// Tries `key` again: soon after a conflict, else after a backoff that doubles with
    /// each failure in a row (100 ms to 30 s).
    pub fn schedule(&mut self, key: ServiceKey, conflict: bool) {
        let attempts = self.attempts.entry(key.clone()).or_default();
        *attempts += 1;
        // A conflict is usually resolved by the newer object the watch is delivering:
        // try again soon, but back off too should the watch be down.
        let (first, most) = if conflict {
            (Duration::from_millis(50), Duration::from_secs(5))
        } else {
            (Duration::from_millis(100), Duration::from_secs(30))
        };
        let delay = first.saturating_mul(1 << (*attempts - 1).min(9)).min(most);
        self.due.insert(key, Some(Instant::now() + delay));
    }

    pub fn succeeded(&mut self, key: &ServiceKey) {
        self.due.remove(key);
        self.attempts.remove(key);
    }

    /// Waits for the next retry that is due.
    pub async fn next(&mut self) -> ServiceKey {
        let Some((key, when)) = self
            .due
            .iter()
            .filter_map(|(k, w)| w.map(|w| (k.clone(), w)))
            .min_by_key(|(_, w)| *w)
        else {
            return std::future::pending().await;
        };
        tokio::time::sleep_until(when.into()).await;
        self.due.insert(key.clone(), None);
        key
    }
}
