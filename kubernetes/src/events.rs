//! Events on Services (events.k8s.io/v1), what `kubectl describe svc` shows.
//!
//! Written directly rather than through kube-runtime's `Recorder`: the Recorder keeps
//! every Event it sent for six minutes and scans them all on each publish, to fold
//! repeats into a series. ferrolb sends an Event only when what it says changes, so there
//! is nothing to fold, and with 10,000 Services that cache cost memory and a scan per
//! Event for nothing. Needs only `create` on events.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};

/// Who sends the Events: `controller` shows in `kubectl describe` as From.
#[derive(Clone)]
pub struct Events {
    client: Client,
    controller: String,
    instance: String,
}

impl Events {
    pub fn new(client: Client, controller: &str, instance: &str) -> Events {
        Events {
            client,
            controller: controller.to_string(),
            instance: instance.to_string(),
        }
    }

    /// Creates one Event about `regarding` (in its namespace).
    pub async fn publish(
        &self,
        regarding: ObjectReference,
        warning: bool,
        reason: &str,
        note: &str,
        action: &str,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let namespace = regarding
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = format!(
            "{}.{:x}",
            regarding.name.as_deref().unwrap_or(&self.controller),
            now.as_nanosecond()
        );
        let event = Event {
            metadata: ObjectMeta {
                name: Some(name),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            action: Some(action.to_string()),
            reason: Some(reason.to_string()),
            note: Some(truncate(note, 1000)),
            type_: Some(if warning { "Warning" } else { "Normal" }.to_string()),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Default::default()
        };
        Api::<Event>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &event)
            .await
            .map(drop)
    }
}

/// At most `max` bytes (the API server refuses notes over 1 kB), cut at a character.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
