//! Carrying out the reconciler's [`Action`]s, and retrying what fails.
//!
//! A Service's status is written with a JSON merge patch on its status subresource,
//! conditional on the resourceVersion the decision was made from: if the Service changed
//! meanwhile (a 409 Conflict), the write is retried from the newer object, so a decision
//! is never written over a change it did not see. Failed writes are retried after the
//! delays of [`ferrolb_kubernetes::retry::Backoff`] (jittered, 100 ms doubling to 30 s),
//! per Service and per pool; nothing is dropped but writes to deleted objects and writes
//! the API server refuses as invalid (the next change of the Service decides again).
//!
//! The announced condition ([`crate::announced`]) is written with server-side apply, one
//! field manager per family (`ferrolb-controller-ipv4`, `-ipv6`), so that writing one
//! family's condition leaves the other's, `status.loadBalancer` and everyone else's
//! conditions alone; each write is followed by the `NodeAssigned` (or `NoEligibleNode`)
//! Event that tells of it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrolb_api::{IPAddressPool, IPAddressPoolStatus};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tracing::{debug, error, info, warn};

use ferrolb_kubernetes::error::{ApiError, Retry};
use ferrolb_kubernetes::retry::Retries;

use super::metrics::Metrics;
use crate::announced::{Announced, ConditionWrite};
use crate::reconcile::{self, Action, Reconciler, ServiceEvent};
use ferrolb_allocator::ServiceKey;
use ferrolb_kubernetes::events::Events;

/// The field manager of every write.
pub use crate::reconcile::FIELD_MANAGER;
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
        retries: &mut Retrying,
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
                        retries.services.succeeded(&key);
                        reconciler.service_written(&svc);
                    }
                    Err(e) => {
                        let error = ApiError::from_kube(&e);
                        match error {
                            ApiError::NotFound { .. } => {
                                debug!(service = %key, "not written: the Service is gone");
                            }
                            ApiError::Conflict { .. } => {
                                debug!(service = %key, "the Service changed meanwhile; deciding again");
                                reconciler.write_failed(&key);
                                retries.services.schedule(key);
                            }
                            _ if error.retry() == Retry::No => {
                                error!(service = %key, "cannot write status.loadBalancer, not retrying until the Service changes: {}", explain(&error, "patch", "services/status"));
                                reconciler.write_failed(&key);
                            }
                            _ => {
                                reconciler.write_failed(&key);
                                let delay = retries.services.schedule(key.clone());
                                error!(service = %key, retry_in = ?delay, "cannot write status.loadBalancer: {}", explain(&error, "patch", "services/status"));
                            }
                        }
                    }
                },
                Done::Pool(name, status, Ok(())) => {
                    retries.pools.succeeded(&name);
                    reconciler.pool_written(&name, status);
                }
                Done::Pool(name, _, Err(e)) => {
                    // Computed again and written when the delay ends: a failure that
                    // lasts (RBAC) costs a request and a line every 30 s, not every flush.
                    let delay = retries.pools.schedule(name.clone());
                    warn!(pool = %name, retry_in = ?delay, "cannot write the pool's status: {}", explain(&ApiError::from_kube(&e), "patch", "ipaddresspools/status"));
                }
                Done::Event(_, Ok(())) => {}
                Done::Event(key, Err(e)) => {
                    reconciler.write_failed(&key);
                    let delay = retries.services.schedule(key.clone());
                    warn!(service = %key, retry_in = ?delay, "cannot record an Event: {}", explain(&ApiError::from_kube(&e), "create", "events"));
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

    /// Writes the announced conditions (different Services concurrently), tells
    /// `announced` what was written, and schedules retries for what failed.
    pub async fn announce(
        &self,
        writes: Vec<ConditionWrite>,
        announced: &mut Announced,
        retries: &mut Retrying,
    ) {
        if writes.is_empty() {
            return;
        }
        let results: Vec<(ConditionWrite, Result<Option<u64>, kube::Error>)> =
            futures::stream::iter(writes)
                .map(|w| async move {
                    let result = self.condition(&w).await;
                    (w, result)
                })
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
        for (w, result) in results {
            match result {
                Ok(version) => {
                    retries.conditions.succeeded(&w.key);
                    announced.written(&w, version);
                }
                Err(e) => match ApiError::from_kube(&e) {
                    ApiError::NotFound { .. } => {
                        debug!(service = %w.key, "condition not written: the Service is gone");
                    }
                    error => {
                        let delay = retries.conditions.schedule(w.key.clone());
                        warn!(service = %w.key, retry_in = ?delay, "cannot write the announced condition: {}", explain(&error, "patch", "services/status"));
                    }
                },
            }
        }
    }

    /// One announced condition by server-side apply, then its Event; the Service's
    /// resourceVersion after the write.
    async fn condition(&self, w: &ConditionWrite) -> Result<Option<u64>, kube::Error> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &w.key.namespace);
        let manager = if w.ipv6 {
            "ferrolb-controller-ipv6"
        } else {
            "ferrolb-controller-ipv4"
        };
        let apply = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": w.key.name, "namespace": w.key.namespace },
            "status": { "conditions": [{
                "type": w.type_,
                "status": w.status,
                "reason": w.reason,
                "message": w.message,
                "lastTransitionTime": Time(Timestamp::now()),
            }]},
        });
        let params = PatchParams::apply(manager).force();
        let svc = match api
            .patch_status(&w.key.name, &params, &Patch::Apply(apply))
            .await
        {
            Ok(svc) => svc,
            Err(e) => {
                self.metrics.api_error("services/status", "patch", &e);
                return Err(e);
            }
        };
        Metrics::count(&self.metrics.writes, "service_condition");
        info!(service = %w.key, "{}", w.message);
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: svc.metadata.namespace.clone(),
            name: svc.metadata.name.clone(),
            uid: svc.metadata.uid.clone().or_else(|| w.uid.clone()),
            ..Default::default()
        };
        let warning = w.status != "True";
        match self
            .events
            .publish(reference, warning, w.reason, &w.message, "Announce")
            .await
        {
            Ok(()) => Metrics::count(&self.metrics.writes, "event"),
            Err(e) => {
                self.metrics.api_error("events", "create", &e);
                warn!(service = %w.key, "cannot record the {} Event: {e}", w.reason);
            }
        }
        Ok(svc
            .metadata
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok()))
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
fn explain(error: &ApiError, verb: &str, resource: &str) -> String {
    error.explain("controller", verb, resource)
}

/// What is to be written again when its delay ends: Service status (and the Events
/// that follow it), pool status, and announced conditions.
#[derive(Default)]
pub struct Retrying {
    pub services: Retries<ServiceKey>,
    pub pools: Retries<String>,
    pub conditions: Retries<ServiceKey>,
}
