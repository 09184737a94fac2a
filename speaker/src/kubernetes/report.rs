//! Telling people which node announces each IP: a condition on the Service
//! (`ferrolb.io/AnnouncedIPv4` / `ferrolb.io/AnnouncedIPv6`, "198.51.100.10 is announced
//! by node-a on eth0") and a `NodeAssigned` Event, written by the node that takes the IP
//! over, only when that changes.
//!
//! Writes follow ownership, never time or the number of Services: nothing at rest,
//! nothing when a speaker restarts into the ownership it had (the condition already
//! says so), and after a failover the new owner's write replaces the old text. They run
//! in a task of their own, so an unreachable API server never holds up the data plane;
//! failed writes are retried, newest state first.
//!
//! The condition is written with server-side apply, one field manager per family
//! (`ferrolb-speaker-ipv4`, `ferrolb-speaker-ipv6`) shared by every node: a new owner's
//! apply takes the condition over from the old one without touching the other family's,
//! the controller's `status.loadBalancer`, or anyone else's conditions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ferrolb_api::Family;
use ferrolb_api::manifests::Manifests;
use ferrolb_controller::allocator::ServiceKey;

use crate::daemon::Ownership;
use ferrolb_controller::kubernetes::events::Events;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, warn};

pub const REASON_ASSIGNED: &str = "NodeAssigned";
pub const REASON_NONE: &str = "NoEligibleNode";

/// The condition type for an IP's family.
pub fn condition_type(ip: IpAddr) -> &'static str {
    match Family::of(ip) {
        Family::V4 => "ferrolb.io/AnnouncedIPv4",
        Family::V6 => "ferrolb.io/AnnouncedIPv6",
    }
}

/// The condition's (status, reason, message) for `o` on `node`.
pub fn condition_text(o: &Ownership, node: &str) -> (&'static str, &'static str, String) {
    if o.interfaces.is_empty() {
        (
            "False",
            REASON_NONE,
            format!(
                "{} is announced by no node: none is eligible (node selectors, the exclusion label, NotReady, or no ready local endpoint)",
                o.ip
            ),
        )
    } else {
        (
            "True",
            REASON_ASSIGNED,
            format!(
                "{} is announced by {node} on {}",
                o.ip,
                o.interfaces.join(", ")
            ),
        )
    }
}

/// Hands the newest ownership to the reporting task.
pub struct Reports {
    tx: watch::Sender<Vec<Ownership>>,
}

impl Reports {
    pub fn start(
        client: Client,
        node: String,
        snapshots: watch::Receiver<Arc<Manifests>>,
    ) -> Reports {
        let (tx, rx) = watch::channel(Vec::new());
        tokio::spawn(run(client, node, rx, snapshots));
        Reports { tx }
    }

    pub fn update(&self, owned: Vec<Ownership>) {
        self.tx.send_if_modified(|current| {
            let changed = *current != owned;
            *current = owned;
            changed
        });
    }
}

async fn run(
    client: Client,
    node: String,
    mut owned: watch::Receiver<Vec<Ownership>>,
    snapshots: watch::Receiver<Arc<Manifests>>,
) {
    let events = Events::new(client.clone(), "ferrolb-speaker", &node);
    // What this task wrote, so that a write is not repeated before the watch shows it.
    let mut written: BTreeMap<(ServiceKey, &'static str), String> = BTreeMap::new();
    let mut retry = false;
    loop {
        if retry {
            tokio::select! {
                _ = owned.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        } else if owned.changed().await.is_err() {
            return;
        }
        let wanted = owned.borrow_and_update().clone();
        // Ownership is planned from a snapshot, so the newest one is at least as new.
        let snapshot = snapshots.borrow().clone();
        // The Services by key, built the first time one must be looked at.
        let mut services: Option<BTreeMap<(&str, &str), &Service>> = None;
        retry = false;
        for o in &wanted {
            for key in &o.services {
                let type_ = condition_type(o.ip);
                let (status, reason, message) = condition_text(o, &node);
                if written.get(&(key.clone(), type_)) == Some(&message) {
                    continue;
                }
                let services = services.get_or_insert_with(|| by_key(&snapshot));
                if says(services, key, type_, &message) {
                    // Already true (a restart into the same ownership): remember it, so
                    // the Services are not searched again on every change.
                    written.insert((key.clone(), type_), message);
                    continue;
                }
                match write(&client, &events, key, o, type_, status, reason, &message).await {
                    Ok(()) => {
                        written.insert((key.clone(), type_), message);
                    }
                    Err(e) => {
                        warn!(service = %key, ip = %o.ip, "cannot report the announcing node: {e}");
                        retry = true;
                    }
                }
            }
        }
        // Forget what is no longer ours, so that owning it again is reported again.
        let still: BTreeSet<(&ServiceKey, &str)> = wanted
            .iter()
            .flat_map(|o| o.services.iter().map(|k| (k, condition_type(o.ip))))
            .collect();
        written.retain(|(key, type_), _| still.contains(&(key, *type_)));
    }
}

fn by_key(m: &Manifests) -> BTreeMap<(&str, &str), &Service> {
    m.services
        .iter()
        .map(|s| {
            let meta = &s.object.metadata;
            let key = (
                meta.namespace.as_deref().unwrap_or("default"),
                meta.name.as_deref().unwrap_or_default(),
            );
            (key, &*s.object)
        })
        .collect()
}

/// Whether the Service's condition already says `message`.
fn says(
    services: &BTreeMap<(&str, &str), &Service>,
    key: &ServiceKey,
    type_: &str,
    message: &str,
) -> bool {
    services
        .get(&(key.namespace.as_str(), key.name.as_str()))
        .and_then(|svc| svc.status.as_ref())
        .and_then(|st| st.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == type_ && c.message == message)
}

#[allow(clippy::too_many_arguments)]
async fn write(
    client: &Client,
    events: &Events,
    key: &ServiceKey,
    o: &Ownership,
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
) -> Result<(), kube::Error> {
    let api: Api<Service> = Api::namespaced(client.clone(), &key.namespace);
    let manager = match Family::of(o.ip) {
        Family::V4 => "ferrolb-speaker-ipv4",
        Family::V6 => "ferrolb-speaker-ipv6",
    };
    let apply = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": key.name, "namespace": key.namespace },
        "status": { "conditions": [{
            "type": type_,
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": Time(Timestamp::now()),
        }]},
    });
    let params = PatchParams::apply(manager).force();
    let svc = match api
        .patch_status(&key.name, &params, &Patch::Apply(apply))
        .await
    {
        Ok(svc) => svc,
        // Deleted meanwhile: nothing to tell.
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
        Err(e) => return Err(e),
    };
    debug!(service = %key, "{message}");
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Service".into()),
        namespace: svc.metadata.namespace.clone(),
        name: svc.metadata.name.clone(),
        uid: svc.metadata.uid.clone(),
        ..Default::default()
    };
    let warning = status != "True";
    if let Err(e) = events
        .publish(reference, warning, reason, message, "Announce")
        .await
    {
        warn!(service = %key, "cannot record the {reason} Event: {e}");
    }
    Ok(())
}
