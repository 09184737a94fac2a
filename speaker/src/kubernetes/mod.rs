//! The speaker in a cluster: the API server's objects feed the same loop as files do
//! ([`crate::daemon`]), the IPs announced are those the controller wrote in Service
//! status, and each node says what it announces in a record of its own, which the
//! controller turns into each Service's condition.
//!
//! * [`objects`]: watches folded into a [`Manifests`](ferrolb_api::manifests::Manifests)
//!   snapshot.
//! * [`pools`]: what this node resolved for a `fromNodeNetwork` pool, written to the
//!   pool's `status.nodeNetwork`.
//! * [`record`]: this node's `NodeAnnouncement` (which IPs it announces, on which
//!   interfaces, for which Services), written on ownership changes only.
//! * [`readiness`]: what `/readyz` and `ferrolb_speaker_api_connected` say of the
//!   watches.
//!
//! The API server is needed to learn of changes, never to keep announcing: when it is
//! unreachable the speaker keeps the last objects, keeps answering and keeps failing
//! over on membership, and catches up when it returns. It stays ready meanwhile, and
//! says it is degraded.

pub mod objects;
pub mod pools;
pub mod readiness;
pub mod record;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use ferrolb_api::manifests::Manifests;
use kube::Client;
use tokio::sync::watch;
use tracing::{Instrument, info};

use crate::daemon::{self, NodeHealth, Objects, Ownership, Resolved};
use crate::metrics::Metrics;
use objects::WatchHealth;
use record::Record;

/// How `ferrolb speaker` runs in a cluster.
pub struct Options {
    pub daemon: daemon::Options,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub metrics_address: SocketAddr,
    /// ferrolb's namespace, where this node's `NodeAnnouncement` lives.
    pub namespace: String,
}

/// The cluster as an [`Objects`] source.
struct ClusterObjects {
    client: Client,
    snapshots: watch::Receiver<Arc<Manifests>>,
    record: Arc<Record>,
}

impl Objects for ClusterObjects {
    fn current(&mut self) -> Arc<Manifests> {
        self.snapshots.borrow_and_update().clone()
    }

    async fn changed(&mut self) -> Result<()> {
        self.snapshots
            .changed()
            .await
            .map_err(|_| anyhow::anyhow!("the watches stopped"))
    }

    fn owned(&mut self, owned: Vec<Ownership>) {
        self.record.update(owned);
    }

    fn node_health(&mut self, health: NodeHealth) {
        self.record.node_health(health);
    }

    fn resolves_pools(&self) -> bool {
        true
    }

    fn resolved(&mut self, resolved: Resolved) {
        tokio::spawn(
            pools::write(self.client.clone(), self.snapshots.clone(), resolved).in_current_span(),
        );
    }
}

/// Runs until SIGTERM or SIGINT, then withdraws everything it announced.
pub async fn run(client: Client, options: Options) -> Result<()> {
    let (snapshots, health) = objects::watch(client.clone());
    let metrics = options.daemon.metrics.clone();
    let served = serve(options.metrics_address, metrics, health).await?;
    info!(address = %served, node = %options.daemon.node_name, "speaker started (cluster); serving /metrics, /healthz and /readyz");
    // Nothing can be judged before the objects are known (not even this node's own
    // address, which membership binds to): wait for every watch's first list.
    let mut snapshots = snapshots;
    snapshots
        .changed()
        .await
        .map_err(|_| anyhow::anyhow!("the watches stopped before their first list"))?;
    info!("listed the cluster's objects; starting");
    let record = Arc::new(Record::start(
        client.clone(),
        &options.namespace,
        options.daemon.node_name.clone(),
        snapshots.clone(),
    ));
    let objects = ClusterObjects {
        client,
        snapshots,
        record: record.clone(),
    };
    let result = daemon::run(objects, options.daemon).await;
    // Withdrawn (or failed): what this node announced is no longer true.
    if let Ok(record) = Arc::try_unwrap(record) {
        record.leave().await;
    }
    result
}

async fn serve(
    address: SocketAddr,
    metrics: Arc<Metrics>,
    health: watch::Receiver<WatchHealth>,
) -> Result<SocketAddr> {
    let ready = {
        let health = health.clone();
        move || readiness::readiness(&health.borrow())
    };
    let render = move || {
        readiness::record(&metrics, &health.borrow());
        metrics.encode()
    };
    ferrolb_kubernetes::http::serve_readiness(address, Arc::new(render), Arc::new(ready))
        .await
        .map_err(|e| anyhow::anyhow!("serving metrics on {address}: {e}"))
}
