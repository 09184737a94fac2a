//! What each node gossips about itself ([`NodeMeta`]), versioned so that the newest word
//! of the newest process wins, and small enough to fit in one datagram.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use foca::Invalidates;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::identity::NodeId;

/// Our own [`NodeMeta`] must fit in a datagram next to foca's header and updates.
const MAX_META_BYTES: usize = 900;

/// What a node tells the others about itself (small; gossiped on change).
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Subnets of the node's usable links: the election only picks a node that can reach
    /// an IP's segment.
    pub subnets: Vec<IpNetwork>,
    /// Up for longer than the rejoin hold-down (see `crate::cluster`).
    pub settled: bool,
    /// When the node's speaker started (Unix milliseconds), to tell a cold start (every
    /// node starting together) from one node rejoining a running cluster.
    pub started_at_ms: u64,
    /// True in every NodeMeta a node sends; false in the default shown for a member
    /// whose metadata has not arrived yet, so that "unknown" is not read as "no subnets".
    pub reported: bool,
    /// kube-proxy on the node fails its health check (`crate::proxy_health`): it may
    /// not deliver what it announces. Last, so that a speaker one version older still
    /// reads the fields before it (it ignores what follows).
    pub proxy_failing: bool,
}

/// A node's metadata as gossiped: kept per process (its random epoch) and versioned
/// within it, so that a newer word of a process replaces an older one; which process
/// is the member now is foca's identity (see `Driver::publish_members`).
#[derive(Serialize, Deserialize)]
struct MetaUpdate {
    name: String,
    epoch: u64,
    version: u64,
    meta: NodeMeta,
}

pub(super) fn encode_meta(
    name: &str,
    epoch: u64,
    version: u64,
    meta: &NodeMeta,
) -> anyhow::Result<Vec<u8>> {
    let update = MetaUpdate {
        name: name.to_owned(),
        epoch,
        version,
        meta: meta.clone(),
    };
    let bytes = postcard::to_allocvec(&update).context("encoding node metadata")?;
    // Names are at most 253 bytes; checking the worst case keeps set_meta honest.
    if bytes.len() + 253usize.saturating_sub(name.len()) > MAX_META_BYTES {
        bail!(
            "node metadata too large to gossip ({} subnets)",
            meta.subnets.len()
        );
    }
    Ok(bytes)
}

pub(super) struct MetaKey {
    name: String,
    epoch: u64,
    version: u64,
}

impl Invalidates for MetaKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.name == other.name && self.epoch == other.epoch && self.version >= other.version
    }
}

/// Processes remembered per node name: the current one and a few before it (whose
/// gossip may still be on its way).
const PROCESSES_PER_NAME: usize = 4;

/// Newest metadata per node name and process: (epoch, version, metadata), the most
/// recently updated last.
pub(super) type MetaTable = HashMap<String, Vec<(u64, u64, NodeMeta)>>;

/// Keeps the newest metadata per node; foca passes on only what is new to us.
pub(super) struct MetaHandler {
    pub(super) metas: Arc<Mutex<MetaTable>>,
    /// Set when something new arrived, so that the members are published again (and
    /// only then).
    pub(super) changed: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("bad node metadata: {0}")]
pub(super) struct BadMeta(#[from] postcard::Error);

impl foca::BroadcastHandler<NodeId> for MetaHandler {
    type Key = MetaKey;
    type Error = BadMeta;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&NodeId>,
    ) -> Result<Option<MetaKey>, BadMeta> {
        let update: MetaUpdate = match postcard::from_bytes(data) {
            Ok(update) => update,
            // A speaker one version older sends no `proxy_failing`, the last byte of the
            // encoding: read it as false (postcard's `false` is one zero byte), so a
            // rolling upgrade keeps every node's metadata.
            Err(postcard::Error::DeserializeUnexpectedEnd) => {
                postcard::from_bytes(&[data, &[0]].concat())?
            }
            Err(e) => return Err(e.into()),
        };
        let mut metas = self.metas.lock().unwrap_or_else(|e| e.into_inner());
        let processes = metas.entry(update.name.clone()).or_default();
        let known = processes
            .iter()
            .position(|(epoch, _, _)| *epoch == update.epoch);
        if let Some(i) = known {
            if processes[i].1 >= update.version {
                return Ok(None);
            }
            processes.remove(i);
        } else if processes.len() >= PROCESSES_PER_NAME {
            processes.remove(0);
        }
        processes.push((update.epoch, update.version, update.meta));
        self.changed.store(true, Ordering::Relaxed);
        Ok(Some(MetaKey {
            name: update.name,
            epoch: update.epoch,
            version: update.version,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newer_metadata_replaces_older_and_restarts_win() {
        let mut handler = MetaHandler {
            metas: Arc::default(),
            changed: Arc::default(),
        };
        let meta = |n: &str| NodeMeta {
            subnets: vec![n.parse().expect("net")],
            settled: false,
            started_at_ms: 0,
            reported: true,
            proxy_failing: false,
        };
        let send = |h: &mut MetaHandler, epoch, version, m: &NodeMeta| {
            let data = encode_meta("a", epoch, version, m).expect("encode");
            foca::BroadcastHandler::receive_item(h, &data, None)
                .expect("decode")
                .is_some()
        };
        assert!(send(&mut handler, 5, 1, &meta("10.0.0.0/24")));
        assert!(
            !send(&mut handler, 5, 1, &meta("10.0.0.0/24")),
            "same version is stale"
        );
        assert!(send(&mut handler, 5, 2, &meta("10.0.1.0/24")));
        assert!(
            !send(&mut handler, 5, 1, &meta("10.0.0.0/24")),
            "older is stale"
        );
        // A restart: another (random) epoch, whatever its value, is a process of its own.
        assert!(
            send(&mut handler, 2, 1, &meta("10.0.2.0/24")),
            "a new process's word is kept"
        );
        assert!(
            send(&mut handler, 5, 3, &meta("10.0.3.0/24")),
            "and the old one's still versioned apart"
        );
        {
            let metas = handler.metas.lock().expect("lock");
            let of = |epoch| {
                metas["a"]
                    .iter()
                    .find(|(e, _, _)| *e == epoch)
                    .map(|(_, _, m)| m.clone())
            };
            assert_eq!(of(2), Some(meta("10.0.2.0/24")));
            assert_eq!(of(5), Some(meta("10.0.3.0/24")));
        }
        for epoch in 10..20 {
            send(&mut handler, epoch, 1, &meta("10.0.0.0/24"));
        }
        assert_eq!(
            handler.metas.lock().expect("lock")["a"].len(),
            PROCESSES_PER_NAME
        );
    }

    /// The metadata of a speaker from before `proxy_failing` is read, as false; what a
    /// newer speaker sends is read by an older one (postcard ignores what follows).
    #[test]
    fn metadata_of_the_previous_version_is_read() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Before {
            subnets: Vec<IpNetwork>,
            settled: bool,
            started_at_ms: u64,
            reported: bool,
        }
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct BeforeUpdate {
            name: String,
            epoch: u64,
            version: u64,
            meta: Before,
        }
        let before = BeforeUpdate {
            name: "a".into(),
            epoch: 1,
            version: 1,
            meta: Before {
                subnets: vec!["10.0.0.0/24".parse().expect("net")],
                settled: true,
                started_at_ms: 7,
                reported: true,
            },
        };
        let mut handler = MetaHandler {
            metas: Arc::default(),
            changed: Arc::default(),
        };
        let old = postcard::to_allocvec(&before).expect("encode");
        foca::BroadcastHandler::receive_item(&mut handler, &old, None).expect("decode");
        let (_, _, meta) = handler.metas.lock().expect("lock")["a"][0].clone();
        assert_eq!(
            meta,
            NodeMeta {
                subnets: before.meta.subnets.clone(),
                settled: true,
                started_at_ms: 7,
                reported: true,
                proxy_failing: false,
            }
        );
        let new = encode_meta(
            "a",
            1,
            2,
            &NodeMeta {
                proxy_failing: true,
                ..meta
            },
        )
        .expect("encode");
        let read: BeforeUpdate = postcard::from_bytes(&new).expect("an older speaker reads it");
        assert_eq!(read.meta, before.meta);
    }

    #[test]
    fn oversized_metadata_is_refused() {
        let subnets = (0..200)
            .map(|i| format!("10.{i}.0.0/16").parse().expect("net"))
            .collect();
        let error = encode_meta(
            "n",
            1,
            1,
            &NodeMeta {
                subnets,
                settled: false,
                started_at_ms: 0,
                reported: true,
                proxy_failing: false,
            },
        )
        .expect_err("200 subnets do not fit");
        assert_eq!(
            error.to_string(),
            "node metadata too large to gossip (200 subnets)"
        );
        assert!(encode_meta("n", 1, 1, &NodeMeta::default()).is_ok());
    }
}
