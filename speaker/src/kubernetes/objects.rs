//! The cluster's objects as the speaker needs them: watches of LoadBalancer Services,
//! EndpointSlices, Nodes, IPAddressPools and L2Advertisements, folded into the same
//! [`Manifests`] snapshot that files give in standalone mode, so everything downstream
//! is shared.
//!
//! Objects are trimmed as they arrive (managed fields, Node images and capacity,
//! endpoint addresses), so memory follows what the speaker reads, not the cluster's
//! size. The snapshot is published only once every watch has listed; while the API
//! server is unreachable the last one stays in force, so announcements and failover go
//! on without it.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrolb_api::manifests::{Located, Manifests, Origin};
use ferrolb_api::{IPAddressPool, L2Advertisement};
use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Node, NodeStatus, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch as channel;
use tracing::{error, info};

/// Which watch a change came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Services,
    EndpointSlices,
    Nodes,
    Pools,
    Advertisements,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices.discovery.k8s.io",
            Kind::Nodes => "nodes",
            Kind::Pools => "ipaddresspools.ferrolb.io",
            Kind::Advertisements => "l2advertisements.ferrolb.io",
        }
    }
}

enum Change {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
    Pool(Box<watcher::Event<IPAddressPool>>),
    Advertisement(Box<watcher::Event<L2Advertisement>>),
    Error(Kind, String),
}

/// What the watches report, for `/readyz` and logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WatchHealth {
    /// Every watch has listed at least once.
    pub synced: bool,
    /// The last error of each failing watch.
    pub errors: BTreeMap<&'static str, String>,
}

/// Starts the watches; the first receiver gets a new snapshot after every change (from
/// the first complete list on), the second the watches' health.
pub fn watch(
    client: Client,
) -> (
    channel::Receiver<Arc<Manifests>>,
    channel::Receiver<WatchHealth>,
) {
    let (snapshots, snapshot_rx) = channel::channel(Arc::new(Manifests::default()));
    let (health, health_rx) = channel::channel(WatchHealth::default());
    tokio::spawn(run(client, snapshots, health));
    (snapshot_rx, health_rx)
}

async fn run(
    client: Client,
    snapshots: channel::Sender<Arc<Manifests>>,
    health: channel::Sender<WatchHealth>,
) {
    let mut changes = changes(client);
    let mut state = State::default();
    while let Some(change) = changes.next().await {
        let mut batch = vec![change];
        // Changes come in bursts (a Service, then its status, then its condition): fold
        // a burst into one snapshot rather than copying every object for each change.
        let until = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
        while let Ok(Some(more)) = tokio::time::timeout_at(until, changes.next()).await {
            batch.push(more);
        }
        let mut changed = false;
        for change in batch {
            changed |= state.apply(change, &health);
        }
        if changed && state.listed.len() == 5 {
            health.send_if_modified(|h| !std::mem::replace(&mut h.synced, true));
            let _ = snapshots.send(Arc::new(state.manifests()));
        }
    }
}

fn changes(client: Client) -> BoxStream<'static, Change> {
    fn stream<K, F>(
        api: Api<K>,
        config: watcher::Config,
        kind: Kind,
        wrap: F,
    ) -> BoxStream<'static, Change>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        F: Fn(Box<watcher::Event<K>>) -> Change + Send + 'static,
    {
        watcher(api, config)
            .default_backoff()
            .map(move |r| match r {
                Ok(e) => wrap(Box::new(e)),
                Err(e) => {
                    let message = explain(kind, &e);
                    error!(
                        resource = kind.name(),
                        "cannot watch {}: {message}",
                        kind.name()
                    );
                    Change::Error(kind, message)
                }
            })
            .boxed()
    }
    futures::stream::select_all([
        stream(
            Api::<Service>::all(client.clone()),
            watcher::Config::default().fields("spec.type=LoadBalancer"),
            Kind::Services,
            Change::Service,
        ),
        stream(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            Kind::EndpointSlices,
            Change::Slice,
        ),
        stream(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            Kind::Nodes,
            Change::Node,
        ),
        stream(
            Api::<IPAddressPool>::all(client.clone()),
            watcher::Config::default(),
            Kind::Pools,
            Change::Pool,
        ),
        stream(
            Api::<L2Advertisement>::all(client),
            watcher::Config::default(),
            Kind::Advertisements,
            Change::Advertisement,
        ),
    ])
    .boxed()
}

fn explain(kind: Kind, e: &watcher::Error) -> String {
    let name = kind.name();
    let hint = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            if s.code == 403 =>
        {
            format!(
                "; the speaker's ServiceAccount needs list and watch on {name} (see docs/speaker.md, RBAC)"
            )
        }
        watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404 => {
            format!("; is the {name} CRD installed? (`ferrolb crds | kubectl apply -f -`)")
        }
        _ => String::new(),
    };
    format!("{e}{hint}")
}

/// Objects by namespace/name, with relists accounted for.
struct Store<T> {
    objects: BTreeMap<(String, String), T>,
    relist: Option<BTreeMap<(String, String), T>>,
}

impl<T> Default for Store<T> {
    fn default() -> Self {
        Store {
            objects: BTreeMap::new(),
            relist: None,
        }
    }
}

impl<T: kube::Resource> Store<T> {
    /// Applies one event; true when the store changed (or a relist completed).
    fn apply(&mut self, event: watcher::Event<T>, trim: impl Fn(T) -> T) -> (bool, bool) {
        let key = |o: &T| {
            (
                o.meta().namespace.clone().unwrap_or_default(),
                o.meta().name.clone().unwrap_or_default(),
            )
        };
        match event {
            watcher::Event::Apply(o) => {
                self.objects.insert(key(&o), trim(o));
                (true, false)
            }
            watcher::Event::Delete(o) => {
                self.objects.remove(&key(&o));
                (true, false)
            }
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                (false, false)
            }
            watcher::Event::InitApply(o) => {
                self.relist
                    .get_or_insert_with(BTreeMap::new)
                    .insert(key(&o), trim(o));
                (false, false)
            }
            watcher::Event::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                (true, true)
            }
        }
    }
}

#[derive(Default)]
struct State {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    pools: Store<IPAddressPool>,
    advertisements: Store<L2Advertisement>,
    listed: std::collections::BTreeSet<Kind>,
}

impl State {
    fn apply(&mut self, change: Change, health: &channel::Sender<WatchHealth>) -> bool {
        let (kind, (changed, listed)) = match change {
            Change::Error(kind, message) => {
                health.send_if_modified(|h| {
                    h.errors.insert(kind.name(), message.clone()) != Some(message)
                });
                return false;
            }
            Change::Service(e) => (Kind::Services, self.services.apply(*e, trim_service)),
            Change::Slice(e) => (Kind::EndpointSlices, self.slices.apply(*e, trim_slice)),
            Change::Node(e) => (Kind::Nodes, self.nodes.apply(*e, trim_node)),
            Change::Pool(e) => (Kind::Pools, self.pools.apply(*e, trim_meta)),
            Change::Advertisement(e) => (
                Kind::Advertisements,
                self.advertisements.apply(*e, trim_meta),
            ),
        };
        health.send_if_modified(|h| h.errors.remove(kind.name()).is_some());
        if listed && self.listed.insert(kind) {
            info!(resource = kind.name(), objects = self.count(kind), "listed");
        }
        changed
    }

    fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Services => self.services.objects.len(),
            Kind::EndpointSlices => self.slices.objects.len(),
            Kind::Nodes => self.nodes.objects.len(),
            Kind::Pools => self.pools.objects.len(),
            Kind::Advertisements => self.advertisements.objects.len(),
        }
    }

    fn manifests(&self) -> Manifests {
        fn located<T: Clone>(store: &Store<T>) -> Vec<Located<T>> {
            store
                .objects
                .values()
                .map(|o| Located {
                    origin: Origin::cluster(),
                    object: o.clone(),
                })
                .collect()
        }
        Manifests {
            pools: located(&self.pools),
            l2_advertisements: located(&self.advertisements),
            services: located(&self.services),
            namespaces: Vec::new(),
            nodes: located(&self.nodes),
            endpoint_slices: located(&self.slices),
            pods: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

fn trim_meta<T: kube::Resource>(mut o: T) -> T {
    o.meta_mut().managed_fields = None;
    o
}

fn trim_service(s: Service) -> Service {
    let mut s = trim_meta(s);
    s.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
    s
}

/// Only what eligibility reads: the node each endpoint is on, and whether it is ready.
fn trim_slice(s: EndpointSlice) -> EndpointSlice {
    let mut s = trim_meta(s);
    s.metadata.annotations = None;
    s.ports = None;
    for e in s.endpoints.iter_mut().flatten() {
        e.addresses.clear();
        e.target_ref = None;
        e.hints = None;
        e.hostname = None;
        e.zone = None;
        e.deprecated_topology = None;
    }
    s
}

/// Only labels, the Ready condition and the addresses: a Node's images and capacity are
/// most of its size.
fn trim_node(n: Node) -> Node {
    let mut n = trim_meta(n);
    n.metadata.annotations = None;
    n.spec = None;
    n.status = n.status.map(|s| NodeStatus {
        addresses: s.addresses,
        conditions: s
            .conditions
            .map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect()),
        ..Default::default()
    });
    n
}
