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
//! What a node wrote is checked against what the API server shows, not remembered: a
//! node cut off from the API while another took its IPs over, and that takes them back
//! when its link returns, finds its old text in a stale snapshot. Once the watch has
//! caught up (resourceVersions compare, as Kubernetes documents for its own objects) the
//! other node's text shows, and the owner writes the truth again. An owner whose text is
//! overwritten again and again (two nodes that each believe they own an IP) takes it
//! back ever more slowly, up to once a minute.
//!
//! The condition is written with server-side apply, one field manager per family
//! (`ferrolb-speaker-ipv4`, `ferrolb-speaker-ipv6`) shared by every node: a new owner's
//! apply takes the condition over from the old one without touching the other family's,
//! the controller's `status.loadBalancer`, or anyone else's conditions.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use ferrolb_allocator::ServiceKey;
use ferrolb_api::Family;
use ferrolb_api::manifests::Manifests;

use crate::daemon::Ownership;
use ferrolb_kubernetes::error::ApiError;
use ferrolb_kubernetes::events::Events;
use ferrolb_kubernetes::retry::Backoff;
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tracing::{Instrument, debug, warn};

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
                "{} on {}",
                announced_by(o.ip, node),
                o.interfaces.join(", ")
            ),
        )
    }
}

fn announced_by(ip: IpAddr, node: &str) -> String {
    format!("{ip} is announced by {node}")
}

/// Whether `condition` is the one `node` writes when it announces `ip` (on whichever
/// interfaces): how `ferrolb why` finds the announcing node without parsing the text.
pub fn reports(condition: &Condition, ip: IpAddr, node: &str) -> bool {
    condition.type_ == condition_type(ip)
        && condition.status == "True"
        && condition.reason == REASON_ASSIGNED
        && condition
            .message
            .strip_prefix(&announced_by(ip, node))
            .is_some_and(|rest| rest.starts_with(" on "))
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
        tokio::spawn(run(client, node, rx, snapshots).in_current_span());
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

/// How soon the conditions are checked again after the objects change: often enough to
/// correct a stale condition within a second or two, rarely enough that a burst of
/// changes costs one pass.
const VERIFY_PACE: Duration = Duration::from_secs(1);
/// The longest a node waits before taking back a condition overwritten again and again.
const MAX_RETAKE_DELAY: Duration = Duration::from_secs(64);

async fn run(
    client: Client,
    node: String,
    mut owned: watch::Receiver<Vec<Ownership>>,
    mut snapshots: watch::Receiver<Arc<Manifests>>,
) {
    let events = Events::new(client.clone(), "ferrolb-speaker", &node);
    let mut written: BTreeMap<(ServiceKey, &'static str), Written> = BTreeMap::new();
    // Failed reports are tried again after the next delay; a success starts over.
    let mut backoff = Backoff::default();
    let mut retry_at: Option<Instant> = None;
    let mut verify_after = Instant::now();
    loop {
        tokio::select! {
            changed = owned.changed() => if changed.is_err() { return },
            changed = async {
                tokio::time::sleep_until(verify_after).await;
                snapshots.changed().await
            } => if changed.is_err() { return },
            _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {}
        }
        verify_after = Instant::now() + VERIFY_PACE;
        let wanted = owned.borrow_and_update().clone();
        // Ownership is planned from a snapshot, so the newest one is at least as new.
        let snapshot = snapshots.borrow_and_update().clone();
        // The Services by key, built only when something is owned.
        let mut services: Option<BTreeMap<(&str, &str), &Service>> = None;
        let mut failed = false;
        for o in &wanted {
            for key in &o.services {
                let type_ = condition_type(o.ip);
                let (status, reason, message) = condition_text(o, &node);
                let services = services.get_or_insert_with(|| by_key(&snapshot));
                let shown = services.get(&(key.namespace.as_str(), key.name.as_str()));
                let entry = (key.clone(), type_);
                let now = Instant::now();
                match step(shown.copied(), type_, &message, written.get(&entry), now) {
                    Step::Shown => {
                        written.insert(entry, Written::shown(message, now));
                        continue;
                    }
                    Step::Wait => continue,
                    Step::Write => {}
                }
                let retakes = written
                    .get(&entry)
                    .filter(|w| w.message == message && w.version.is_none())
                    .map_or(0, |w| w.retakes + 1);
                match write(&client, &events, key, o, type_, status, reason, &message).await {
                    Ok(version) => {
                        written.insert(entry, Written::new(message, version, retakes, now));
                    }
                    Err(e) => {
                        warn!(service = %key, ip = %o.ip, "cannot report the announcing node: {}", ApiError::from_kube(&e).explain("speaker", "patch", "services/status"));
                        failed = true;
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
        retry_at = if failed {
            let delay = backoff.next_delay();
            debug!(retry_in = ?delay, "reporting again after a failure");
            Some(Instant::now() + delay)
        } else {
            backoff.reset();
            None
        };
    }
}

/// What this node last wrote for one condition, or last saw it say.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    message: String,
    /// The Service's resourceVersion after this node's write, until the watch shows
    /// that version or a newer one; `None` once the message was seen on the Service.
    version: Option<u64>,
    /// How often in a row this node took the condition back after someone overwrote it.
    retakes: u32,
    /// Not written again before this (after retakes).
    not_before: Instant,
}

impl Written {
    fn shown(message: String, now: Instant) -> Written {
        Written {
            message,
            version: None,
            retakes: 0,
            not_before: now,
        }
    }

    fn new(message: String, version: Option<u64>, retakes: u32, now: Instant) -> Written {
        let delay = if retakes == 0 {
            Duration::ZERO
        } else {
            (VERIFY_PACE * 2u32.saturating_pow(retakes.min(8))).min(MAX_RETAKE_DELAY)
        };
        Written {
            message,
            version,
            retakes,
            not_before: now + delay,
        }
    }
}

/// What to do about one condition this node owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The Service says it already.
    Shown,
    /// This node wrote it and the watch has not shown that write yet, or it was taken
    /// back too recently: look again later.
    Wait,
    Write,
}

/// The decision, apart from the API: `shown` is the Service in the newest snapshot.
fn step(
    shown: Option<&Service>,
    type_: &str,
    message: &str,
    written: Option<&Written>,
    now: Instant,
) -> Step {
    let Some(svc) = shown else {
        // Gone, or not seen yet: a write would fail or come too early.
        return Step::Wait;
    };
    if says(svc, type_, message) {
        return Step::Shown;
    }
    let Some(w) = written.filter(|w| w.message == message) else {
        return Step::Write;
    };
    let seen = svc
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse::<u64>().ok());
    match (w.version, seen) {
        // The snapshot predates this node's write.
        (Some(mine), Some(seen)) if seen < mine => Step::Wait,
        _ if now < w.not_before => Step::Wait,
        _ => Step::Write,
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
fn says(svc: &Service, type_: &str, message: &str) -> bool {
    svc.status
        .as_ref()
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
) -> Result<Option<u64>, kube::Error> {
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
        Err(e) if matches!(ApiError::from_kube(&e), ApiError::NotFound { .. }) => return Ok(None),
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
    Ok(svc
        .metadata
        .resource_version
        .as_deref()
        .and_then(|v| v.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPE: &str = "ferrolb.io/AnnouncedIPv4";
    const MINE: &str = "192.0.2.10 is announced by a on eth0";
    const THEIRS: &str = "192.0.2.10 is announced by b on eth0";

    fn service(version: &str, message: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "resourceVersion": version},
            "status": {"conditions": [{"type": TYPE, "status": "True", "reason": REASON_ASSIGNED,
                "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))
        .unwrap()
    }

    fn written(ip: IpAddr, status: &str, reason: &str, message: String) -> Condition {
        Condition {
            type_: condition_type(ip).into(),
            status: status.into(),
            reason: reason.into(),
            message,
            last_transition_time: Time(Timestamp::now()),
            observed_generation: None,
        }
    }

    #[test]
    fn the_written_condition_names_its_node_and_no_other() {
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let o = Ownership {
            ip,
            interfaces: vec!["eth0".into(), "eth1".into()],
            services: vec![],
        };
        let (status, reason, message) = condition_text(&o, "node-a");
        let condition = written(ip, status, reason, message);
        assert!(reports(&condition, ip, "node-a"));
        // A node whose name the owner's begins with, another IP, or no owner at all.
        assert!(!reports(&condition, ip, "node"));
        assert!(!reports(&condition, "192.0.2.1".parse().unwrap(), "node-a"));
        let (status, reason, message) = condition_text(
            &Ownership {
                interfaces: vec![],
                ..o
            },
            "node-a",
        );
        let none = written(ip, status, reason, message);
        assert!(!reports(&none, ip, "node-a"));
    }

    #[test]
    fn a_condition_the_service_shows_is_not_written_again() {
        let now = Instant::now();
        assert_eq!(
            step(Some(&service("5", MINE)), TYPE, MINE, None, now),
            Step::Shown
        );
    }

    #[test]
    fn a_new_owner_writes() {
        let now = Instant::now();
        assert_eq!(
            step(Some(&service("5", THEIRS)), TYPE, MINE, None, now),
            Step::Write
        );
        // A Service not in the snapshot yet is not written to.
        assert_eq!(step(None, TYPE, MINE, None, now), Step::Wait);
    }

    #[test]
    fn a_write_the_watch_has_not_shown_yet_is_not_repeated() {
        let now = Instant::now();
        let written = Written::new(MINE.into(), Some(9), 0, now);
        assert_eq!(
            step(Some(&service("8", THEIRS)), TYPE, MINE, Some(&written), now),
            Step::Wait
        );
    }

    /// The bug of a healed partition: the owner's text was seen (or written), then
    /// another node overwrote it; the owner must write the truth again, not trust what
    /// it remembers.
    #[test]
    fn an_overwritten_condition_is_taken_back() {
        let now = Instant::now();
        let seen = Written::shown(MINE.into(), now);
        assert_eq!(
            step(Some(&service("12", THEIRS)), TYPE, MINE, Some(&seen), now),
            Step::Write
        );
        let written = Written::new(MINE.into(), Some(9), 0, now);
        assert_eq!(
            step(
                Some(&service("10", THEIRS)),
                TYPE,
                MINE,
                Some(&written),
                now
            ),
            Step::Write
        );
        // Unparsable versions cannot tell stale from newer: write.
        assert_eq!(
            step(Some(&service("x", THEIRS)), TYPE, MINE, Some(&written), now),
            Step::Write
        );
    }

    #[test]
    fn a_condition_overwritten_again_and_again_is_taken_back_ever_more_slowly() {
        let now = Instant::now();
        let mut delays = Vec::new();
        for retakes in 1..=10 {
            let w = Written::new(MINE.into(), None, retakes, now);
            assert_eq!(
                step(Some(&service("20", THEIRS)), TYPE, MINE, Some(&w), now),
                Step::Wait
            );
            assert_eq!(
                step(
                    Some(&service("20", THEIRS)),
                    TYPE,
                    MINE,
                    Some(&w),
                    w.not_before
                ),
                Step::Write
            );
            delays.push(w.not_before - now);
        }
        assert!(delays.windows(2).all(|d| d[0] <= d[1]), "{delays:?}");
        assert_eq!(delays.last(), Some(&MAX_RETAKE_DELAY));
    }
}
