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
use ferrolb_kubernetes::retry::Backoff;
use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{
    Node, NodeCondition, NodeStatus, Service, ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, ObjectRef, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch as channel;
use tracing::{Instrument, error, info};

use crate::announcements::SERVICE_NAME_LABEL;

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
    tokio::spawn(run(client, snapshots, health).in_current_span());
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
            .backoff(Backoff::default())
            .map(move |r| match r {
                Ok(e) => wrap(Box::new(e)),
                Err(e) => {
                    let message =
                        ferrolb_kubernetes::error::explain_watch("speaker", kind.name(), &e);
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

/// One kind's objects: kube-runtime's reflector store (relists included), each object
/// trimmed before it is stored and kept behind an `Arc`, so that a snapshot shares them
/// instead of copying them.
struct Store<T: kube::Resource<DynamicType = ()> + Clone + 'static> {
    writer: Writer<T>,
    objects: reflector::Store<T>,
}

impl<T: kube::Resource<DynamicType = ()> + Clone + 'static> Default for Store<T> {
    fn default() -> Self {
        let writer = Writer::default();
        Store {
            objects: writer.as_reader(),
            writer,
        }
    }
}

impl<T: kube::Resource<DynamicType = ()> + Clone + 'static> Store<T> {
    /// Applies one event: (whether the objects changed, whether a list completed). An
    /// update that leaves the trimmed object as it was is no change: a Node's status
    /// report (every few minutes from every kubelet, many a second at thousands of
    /// nodes) would otherwise cost a new snapshot and an election of every IP.
    fn apply(&mut self, event: watcher::Event<T>, trim: impl Fn(T) -> T) -> (bool, bool)
    where
        T: PartialEq,
    {
        let (event, outcome) = match event {
            watcher::Event::Apply(o) => {
                let o = trim(o);
                let same = self
                    .objects
                    .get(&ObjectRef::from_obj(&o))
                    .is_some_and(|old| *old == o);
                (watcher::Event::Apply(o), (!same, false))
            }
            watcher::Event::InitApply(o) => (watcher::Event::InitApply(trim(o)), (false, false)),
            watcher::Event::Delete(o) => (watcher::Event::Delete(o), (true, false)),
            watcher::Event::Init => (watcher::Event::Init, (false, false)),
            watcher::Event::InitDone => (watcher::Event::InitDone, (true, true)),
        };
        self.writer.apply_watcher_event(&event);
        outcome
    }

    fn len(&self) -> usize {
        self.objects.len()
    }

    /// Every object, by namespace and name (the store's own order is a hash's).
    fn located(&self) -> Vec<Located<T>> {
        let mut objects = self.objects.state();
        objects.sort_by(|a, b| {
            (a.meta().namespace.as_deref(), a.meta().name.as_deref())
                .cmp(&(b.meta().namespace.as_deref(), b.meta().name.as_deref()))
        });
        objects
            .into_iter()
            .map(|object| Located {
                origin: Origin::cluster(),
                object,
            })
            .collect()
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
            Kind::Services => self.services.len(),
            Kind::EndpointSlices => self.slices.len(),
            Kind::Nodes => self.nodes.len(),
            Kind::Pools => self.pools.len(),
            Kind::Advertisements => self.advertisements.len(),
        }
    }

    fn manifests(&self) -> Manifests {
        Manifests {
            pools: self.pools.located(),
            l2_advertisements: self.advertisements.located(),
            services: self.services.located(),
            namespaces: Vec::new(),
            nodes: self.nodes.located(),
            endpoint_slices: self.slices.located(),
            pods: Vec::new(),
            warnings: Vec::new(),
        }
    }
}

fn trim_meta<T: kube::Resource>(mut o: T) -> T {
    o.meta_mut().managed_fields = None;
    o
}

/// Only what announcing reads: the type and class that make a Service ours, its traffic
/// policy, source ranges and ports, and the IPs in status. Everything else (selectors,
/// cluster IPs, labels, annotations, conditions) would only take memory, 10,000 times over.
fn trim_service(s: Service) -> Service {
    let spec = s.spec.map(|spec| ServiceSpec {
        type_: spec.type_,
        load_balancer_class: spec.load_balancer_class,
        external_traffic_policy: spec.external_traffic_policy,
        load_balancer_source_ranges: spec.load_balancer_source_ranges,
        ports: spec.ports.map(|ports| {
            ports
                .into_iter()
                .map(|p| ServicePort {
                    port: p.port,
                    protocol: p.protocol,
                    node_port: p.node_port,
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    });
    let status = s.status.map(|status| ServiceStatus {
        load_balancer: status.load_balancer,
        conditions: None,
    });
    Service {
        metadata: ObjectMeta {
            name: s.metadata.name,
            namespace: s.metadata.namespace,
            ..Default::default()
        },
        spec,
        status,
    }
}

/// Only what eligibility reads: the Service a slice belongs to, and the node of each
/// endpoint and whether it is ready.
fn trim_slice(s: EndpointSlice) -> EndpointSlice {
    let service = s
        .metadata
        .labels
        .and_then(|mut l| l.remove_entry(SERVICE_NAME_LABEL))
        .map(|entry| [entry].into());
    EndpointSlice {
        metadata: ObjectMeta {
            name: s.metadata.name,
            namespace: s.metadata.namespace,
            labels: service,
            ..Default::default()
        },
        address_type: s.address_type,
        endpoints: s.endpoints.map(|endpoints| {
            endpoints
                .into_iter()
                .map(|e| Endpoint {
                    node_name: e.node_name,
                    conditions: e.conditions.map(|c| EndpointConditions {
                        ready: c.ready,
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect()
        }),
        ports: None,
    }
}

/// Only labels, the Ready condition's status and the addresses: a Node's images and
/// capacity are most of its size, and its heartbeat times and resourceVersion change at
/// every status report while nothing the speaker reads does.
fn trim_node(n: Node) -> Node {
    let mut n = trim_meta(n);
    n.metadata.annotations = None;
    n.metadata.resource_version = None;
    n.spec = None;
    n.status = n.status.map(|s| NodeStatus {
        addresses: s.addresses,
        conditions: s.conditions.map(|c| {
            c.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| NodeCondition {
                    type_: c.type_,
                    status: c.status,
                    ..Default::default()
                })
                .collect()
        }),
        ..Default::default()
    });
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::announcements::{Addresses, plan};
    use crate::election::ClusterView;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {zone: a}, annotations: {note: big}}
status:
  addresses: [{type: InternalIP, address: 10.0.0.1}]
  conditions: [{type: Ready, status: "True"}, {type: MemoryPressure, status: "False"}]
---
apiVersion: v1
kind: Node
metadata: {name: n2, labels: {zone: b}}
status:
  addresses: [{type: InternalIP, address: 10.0.0.2}]
  conditions: [{type: Ready, status: "True"}]
---
apiVersion: v1
kind: Node
metadata: {name: n3, labels: {zone: b, node.kubernetes.io/exclude-from-external-load-balancers: ""}}
status: {addresses: [{type: InternalIP, address: 10.0.0.3}]}
---
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata: {name: p, labels: {tier: web}}
spec: {addresses: [192.0.2.200-192.0.2.209]}
---
apiVersion: ferrolb.io/v1beta1
kind: L2Advertisement
metadata: {name: adv}
spec: {ipAddressPoolSelectors: [{matchLabels: {tier: web}}], forwarding: nodePort}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {app: web}, annotations: {a: b}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}]
status:
  loadBalancer: {ingress: [{ip: 192.0.2.200}]}
  conditions:
  - {type: ferrolb.io/AnnouncedIPv4, status: "True", reason: NodeAssigned, message: "192.0.2.200 is announced by n2 on eth0", lastTransitionTime: "2026-01-01T00:00:00Z"}
  - {type: other.io/Thing, status: "True", reason: R, message: m, lastTransitionTime: "2026-01-01T00:00:00Z"}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  type: LoadBalancer
  loadBalancerSourceRanges: [10.0.0.0/8]
  ports: [{port: 53, nodePort: 30053, protocol: UDP}]
status: {loadBalancer: {ingress: [{ip: 192.0.2.201}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web, other: x}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.1.0.1], nodeName: n1, conditions: {ready: false}}
- {addresses: [10.1.0.2], nodeName: n2, conditions: {ready: true}, zone: a}
"#;

    fn trimmed(m: &Manifests) -> Manifests {
        fn each<T: Clone>(items: &[Located<T>], trim: impl Fn(T) -> T) -> Vec<Located<T>> {
            items
                .iter()
                .map(|l| Located::new(l.origin.clone(), trim((*l.object).clone())))
                .collect()
        }
        Manifests {
            pools: each(&m.pools, trim_meta),
            l2_advertisements: each(&m.l2_advertisements, trim_meta),
            services: each(&m.services, trim_service),
            nodes: each(&m.nodes, trim_node),
            endpoint_slices: each(&m.endpoint_slices, trim_slice),
            ..Manifests::default()
        }
    }

    /// Trimming keeps everything announcing reads: every node plans the same from the
    /// trimmed objects as from the whole ones (owner, ready local endpoint, exclusion,
    /// pool selected by label, NodePort rules of both protocols).
    #[test]
    fn trimmed_objects_plan_the_same() {
        let mut whole = Manifests::default();
        let errors = whole.add_text("objects.yaml", OBJECTS);
        assert!(errors.is_empty(), "{errors:?}");
        let trimmed = trimmed(&whole);
        let addresses = Addresses::FromStatus {
            class: ferrolb_api::annotations::LOAD_BALANCER_CLASS.into(),
        };
        let mut announced = 0;
        for node in ["n1", "n2", "n3"] {
            let view = ClusterView::everyone();
            let expected = plan(&whole, node, &view, &addresses);
            announced += expected.announcements.len();
            assert_eq!(plan(&trimmed, node, &view, &addresses), expected, "{node}");
        }
        assert_eq!(announced, 2, "the fixture should announce both IPs");
    }

    /// A kubelet's status report (new heartbeat time and resourceVersion, nothing else)
    /// costs no snapshot and no election; a node turning NotReady does.
    #[test]
    fn a_node_status_report_that_changes_nothing_read_is_no_change() {
        let node = |version: &str, beat: &str, ready: &str| -> Node {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "n1", "resourceVersion": version, "labels": {"zone": "a"}},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}],
                    "conditions": [{"type": "Ready", "status": ready, "reason": "KubeletReady",
                        "lastHeartbeatTime": beat, "lastTransitionTime": "2026-01-01T00:00:00Z"}]
                }
            }))
            .unwrap()
        };
        let mut store = Store::<Node>::default();
        store.apply(watcher::Event::Init, trim_node);
        store.apply(
            watcher::Event::InitApply(node("1", "2026-01-01T00:00:00Z", "True")),
            trim_node,
        );
        assert_eq!(
            store.apply(watcher::Event::InitDone, trim_node),
            (true, true)
        );
        let report = node("2", "2026-01-01T00:05:00Z", "True");
        assert_eq!(
            store.apply(watcher::Event::Apply(report), trim_node),
            (false, false)
        );
        let not_ready = node("3", "2026-01-01T00:05:40Z", "False");
        assert_eq!(
            store.apply(watcher::Event::Apply(not_ready), trim_node),
            (true, false)
        );
        assert_eq!(store.len(), 1);
    }

    /// The speaker writes nothing on Services, so it keeps none of their conditions.
    #[test]
    fn no_condition_is_kept() {
        let mut whole = Manifests::default();
        assert!(whole.add_text("objects.yaml", OBJECTS).is_empty());
        let web = trim_service((*whole.services[0].object).clone());
        assert_eq!(web.status.and_then(|s| s.conditions), None);
    }
}
