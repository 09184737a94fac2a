//! This node's [`NodeAnnouncement`]: which IPs it announces, on which interfaces, for
//! which Services. The controller turns the records of all nodes into each Service's
//! `ferrolb.io/AnnouncedIPv4`/`IPv6` condition and `NodeAssigned` Event; the speaker
//! itself writes nothing on Services (a compromised node cannot rewrite their status).
//!
//! The record is named after the node and written with server-side apply (field manager
//! `ferrolb-speaker`) only when what this node announces changes: nothing at rest, one
//! write per ownership change (at most two a second while Services come by the
//! thousand), not one per Service. Writes run in a task of their own,
//! so an unreachable API server never holds up the data plane; a failed write is retried
//! after [`Backoff`]'s delays, newest state first. A speaker that leaves gracefully
//! deletes its record; the Node's deletion removes a dead node's (owner reference).
//!
//! Only this node may write this record: the chart's ValidatingAdmissionPolicy refuses
//! the speaker's ServiceAccount any record but the one named after the node its token is
//! bound to (docs/security.md).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ferrolb_api::manifests::Manifests;
use ferrolb_api::{AnnouncedIP, NodeAnnouncement, NodeAnnouncementSpec};
use ferrolb_kubernetes::error::ApiError;
use ferrolb_kubernetes::retry::Backoff;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use crate::daemon::{NodeHealth, Ownership};

/// The field manager of the record's writes.
pub const FIELD_MANAGER: &str = "ferrolb-speaker";
/// The least time between two writes: while Services are created by the thousand,
/// ownership changes on every pass, and each write carries the whole record.
const WRITE_PACE: Duration = Duration::from_millis(500);
/// How long a leaving speaker tries to delete its record.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Hands the newest ownership to the task that writes the record.
pub struct Record {
    tx: watch::Sender<Vec<Ownership>>,
    health: watch::Sender<NodeHealth>,
    task: JoinHandle<()>,
    api: Api<NodeAnnouncement>,
    node: String,
}

impl Record {
    /// Starts writing `node`'s record in `namespace`.
    pub fn start(
        client: Client,
        namespace: &str,
        node: String,
        snapshots: watch::Receiver<Arc<Manifests>>,
    ) -> Record {
        let api: Api<NodeAnnouncement> = Api::namespaced(client, namespace);
        let (tx, rx) = watch::channel(Vec::new());
        let (health, health_rx) = watch::channel(NodeHealth::default());
        let task = tokio::spawn(
            run(api.clone(), node.clone(), rx, health_rx, snapshots).in_current_span(),
        );
        Record {
            tx,
            health,
            task,
            api,
            node,
        }
    }

    pub fn update(&self, owned: Vec<Ownership>) {
        self.tx.send_if_modified(|current| {
            let changed = *current != owned;
            *current = owned;
            changed
        });
    }

    /// What the node says of itself besides its IPs.
    pub fn node_health(&self, health: NodeHealth) {
        self.health.send_if_modified(|current| {
            let changed = *current != health;
            *current = health;
            changed
        });
    }

    /// Stops writing and deletes the record (within a few seconds, or not at all when
    /// the API server cannot be reached: the next owners' records take over).
    pub async fn leave(self) {
        self.task.abort();
        let _ = self.task.await;
        let params = DeleteParams::default();
        let delete = self.api.delete(&self.node, &params);
        match tokio::time::timeout(LEAVE_TIMEOUT, delete).await {
            Ok(Ok(_)) => info!("deleted this node's NodeAnnouncement"),
            Ok(Err(e)) if matches!(ApiError::from_kube(&e), ApiError::NotFound { .. }) => {}
            Ok(Err(e)) => warn!(
                "cannot delete this node's NodeAnnouncement: {}",
                ApiError::from_kube(&e).explain("speaker", "delete", "nodeannouncements")
            ),
            Err(_) => warn!("cannot delete this node's NodeAnnouncement: no answer in time"),
        }
    }
}

async fn run(
    api: Api<NodeAnnouncement>,
    node: String,
    mut owned: watch::Receiver<Vec<Ownership>>,
    mut health: watch::Receiver<NodeHealth>,
    snapshots: watch::Receiver<Arc<Manifests>>,
) {
    let mut claims = Claims::default();
    let mut written: Option<NodeAnnouncementSpec> = None;
    let mut backoff = Backoff::default();
    // No write before this: the pace after a write, the backoff after a failure.
    let mut not_before = Instant::now();
    let mut left_out_before = 0;
    loop {
        let wanted = owned.borrow_and_update().clone();
        let (mut spec, left_out) = claims.spec(&wanted, Timestamp::now());
        let NodeHealth {
            kube_proxy_failing,
            kernel_answers_arp,
        } = health.borrow_and_update().clone();
        spec.kube_proxy_failing = kube_proxy_failing;
        // The record's bound; the message is this speaker's own.
        spec.kernel_answers_arp = kernel_answers_arp.map(|k| k.chars().take(1024).collect());
        if left_out != left_out_before {
            if left_out > 0 {
                warn!(
                    left_out,
                    "this node announces more IPs than its NodeAnnouncement can list; their conditions are not written"
                );
            }
            left_out_before = left_out;
        }
        let mut pending = written.as_ref() != Some(&spec);
        if pending && Instant::now() >= not_before {
            let uid = node_uid(&snapshots.borrow(), &node);
            match apply(&api, &node, uid.as_deref(), &spec).await {
                Ok(()) => {
                    debug!(ips = spec.ips.len(), "wrote this node's NodeAnnouncement");
                    written = Some(spec);
                    pending = false;
                    backoff.reset();
                    not_before = Instant::now() + WRITE_PACE;
                }
                Err(e) => {
                    let delay = backoff.next_delay().max(WRITE_PACE);
                    warn!(retry_in = ?delay, "cannot write this node's NodeAnnouncement: {}", ApiError::from_kube(&e).explain("speaker", "patch", "nodeannouncements"));
                    not_before = Instant::now() + delay;
                }
            }
        }
        // Woken at `not_before` while something is left to write.
        let retry_at = pending.then_some(not_before);
        tokio::select! {
            changed = owned.changed() => if changed.is_err() { return },
            changed = health.changed() => if changed.is_err() { return },
            _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {}
        }
    }
}

/// When this node took each IP over (or gave it up), kept while that stays so.
#[derive(Default)]
struct Claims {
    since: BTreeMap<IpAddr, (Vec<String>, MicroTime)>,
}

impl Claims {
    /// The record's spec for `owned`: an IP keeps its `since` while its interfaces stay
    /// the same (announcing, or given up); a change is a new claim.
    fn spec(&mut self, owned: &[Ownership], now: Timestamp) -> (NodeAnnouncementSpec, usize) {
        let mut since = BTreeMap::new();
        let ips = owned
            .iter()
            .map(|o| {
                let at = match self.since.remove(&o.ip) {
                    Some((interfaces, at)) if interfaces == o.interfaces => at,
                    _ => MicroTime(now),
                };
                since.insert(o.ip, (o.interfaces.clone(), at.clone()));
                AnnouncedIP {
                    ip: o.ip.to_string(),
                    interfaces: o.interfaces.clone(),
                    services: o.services.iter().map(|k| k.to_string()).collect(),
                    since: at,
                    other_responder: o.other.clone(),
                }
            })
            .collect();
        self.since = since;
        NodeAnnouncementSpec::bounded(ips)
    }
}

/// The Node's uid, for the owner reference that has the record deleted with the Node.
fn node_uid(m: &Manifests, node: &str) -> Option<String> {
    m.nodes
        .iter()
        .find(|n| n.object.metadata.name.as_deref() == Some(node))
        .and_then(|n| n.object.metadata.uid.clone())
}

fn body(node: &str, uid: Option<&str>, spec: &NodeAnnouncementSpec) -> Value {
    let mut metadata = json!({ "name": node });
    if let Some(uid) = uid {
        // No blockOwnerDeletion: that would need the right to update the Node.
        metadata["ownerReferences"] =
            json!([{ "apiVersion": "v1", "kind": "Node", "name": node, "uid": uid }]);
    }
    json!({
        "apiVersion": format!("{}/{}", ferrolb_api::GROUP, ferrolb_api::VERSION),
        "kind": "NodeAnnouncement",
        "metadata": metadata,
        "spec": spec,
    })
}

async fn apply(
    api: &Api<NodeAnnouncement>,
    node: &str,
    uid: Option<&str>,
    spec: &NodeAnnouncementSpec,
) -> Result<(), kube::Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(node, &params, &Patch::Apply(body(node, uid, spec)))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrolb_allocator::ServiceKey;

    fn owned(ip: &str, interfaces: &[&str]) -> Ownership {
        Ownership {
            ip: ip.parse().unwrap(),
            interfaces: interfaces.iter().map(|s| s.to_string()).collect(),
            services: vec![ServiceKey {
                namespace: "shop".into(),
                name: "web".into(),
            }],
            other: None,
        }
    }

    #[test]
    fn a_claim_keeps_its_time_until_it_changes() {
        let mut claims = Claims::default();
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let (first, _) = claims.spec(&[owned("192.0.2.10", &["eth0"])], t0);
        assert_eq!(first.ips[0].services, ["shop/web"]);
        assert_eq!(first.ips[0].since, MicroTime(t0));
        // Nothing changed: the same spec, so nothing is written.
        let (again, _) = claims.spec(&[owned("192.0.2.10", &["eth0"])], t1);
        assert_eq!(again, first);
        // Given up: a new claim (no node may announce it now).
        let (given_up, _) = claims.spec(&[owned("192.0.2.10", &[])], t1);
        assert_eq!(given_up.ips[0].since, MicroTime(t1));
        assert!(given_up.ips[0].interfaces.is_empty());
        // Gone and back: a new claim too.
        claims.spec(&[], t1);
        let t2 = Timestamp::from_second(3_000).unwrap();
        let (back, _) = claims.spec(&[owned("192.0.2.10", &["eth0"])], t2);
        assert_eq!(back.ips[0].since, MicroTime(t2));
    }

    #[test]
    fn the_record_is_owned_by_its_node_when_the_node_is_known() {
        let (spec, _) = Claims::default().spec(&[owned("192.0.2.10", &["eth0"])], Timestamp::now());
        let b = body("node-a", Some("u-1"), &spec);
        assert_eq!(b["metadata"]["name"], "node-a");
        assert_eq!(b["metadata"]["ownerReferences"][0]["uid"], "u-1");
        assert_eq!(b["metadata"]["ownerReferences"][0]["kind"], "Node");
        assert_eq!(b["kind"], "NodeAnnouncement");
        assert_eq!(b["spec"]["ips"][0]["ip"], "192.0.2.10");
        let b = body("node-a", None, &spec);
        assert!(b["metadata"].get("ownerReferences").is_none());
    }
}
