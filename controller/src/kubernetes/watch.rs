//! The four watches the controller needs, merged into one stream, and [`Mirror`], which
//! turns a watch's relists into plain "applied" and "deleted" steps.
//!
//! Services are watched with the field selector `spec.type=LoadBalancer` (Kubernetes
//! 1.31 and later), so clusters with thousands of ClusterIP Services cost nothing. A
//! Service that stops being a LoadBalancer leaves the watch as a deletion (carrying its
//! previous state, so it cannot be told from one): its IPs return to the pool, and the
//! API server clears its load-balancer status itself. Namespaces are watched as metadata
//! only: their labels are all that allocation reads. The nodes' NodeAnnouncements are
//! watched in ferrolb's own namespace only.

use std::collections::{BTreeMap, BTreeSet};

use ferrolb_api::{IPAddressPool, NodeAnnouncement};
use ferrolb_kubernetes::retry::Backoff;
use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
use kube::core::PartialObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tracing::error;

use super::Health;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    Services,
    Pools,
    Namespaces,
    Records,
}

impl Resource {
    pub fn name(self) -> &'static str {
        match self {
            Resource::Services => "services",
            Resource::Pools => "ipaddresspools.ferrolb.io",
            Resource::Namespaces => "namespaces",
            Resource::Records => "nodeannouncements.ferrolb.io",
        }
    }
}

pub enum Change {
    Service(Box<watcher::Event<Service>>),
    Pool(Box<watcher::Event<IPAddressPool>>),
    Namespace(Box<watcher::Event<Namespace>>),
    Record(Box<watcher::Event<NodeAnnouncement>>),
    /// A watch failed; it retries with backoff. The message says what to do.
    Error(Resource, String),
}

/// Services, pools, namespaces and the records in `namespace` as one stream of changes.
pub fn changes(client: Client, namespace: &str) -> BoxStream<'static, Change> {
    let records = watcher(
        Api::<NodeAnnouncement>::namespaced(client.clone(), namespace),
        watcher::Config::default(),
    )
    .backoff(Backoff::default())
    .map(|r| {
        r.map(|e| Change::Record(Box::new(map_event(e, trim_meta))))
            .unwrap_or_else(|e| failed(Resource::Records, &e))
    });
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default().fields("spec.type=LoadBalancer"),
    )
    .backoff(Backoff::default())
    .map(|r| {
        r.map(|e| Change::Service(Box::new(map_event(e, trim_service))))
            .unwrap_or_else(|e| failed(Resource::Services, &e))
    });
    let pools = watcher(
        Api::<IPAddressPool>::all(client.clone()),
        watcher::Config::default(),
    )
    .backoff(Backoff::default())
    .map(|r| {
        r.map(|e| Change::Pool(Box::new(e)))
            .unwrap_or_else(|e| failed(Resource::Pools, &e))
    });
    let namespaces = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client),
        watcher::Config::default(),
    )
    .backoff(Backoff::default())
    .map(|r| {
        r.map(|e| Change::Namespace(Box::new(map_event(e, namespace_from_meta))))
            .unwrap_or_else(|e| failed(Resource::Namespaces, &e))
    });
    futures::stream::select_all([
        services.boxed(),
        pools.boxed(),
        namespaces.boxed(),
        records.boxed(),
    ])
    .boxed()
}

fn trim_meta(mut r: NodeAnnouncement) -> NodeAnnouncement {
    r.metadata.managed_fields = None;
    r
}

/// Drops what allocation never reads and what makes a Service large: managed fields and
/// kubectl's copy of the last applied configuration.
fn trim_service(mut svc: Service) -> Service {
    // Of the managed fields, only who wrote the IPs in status: another controller's
    // writes are told apart from ours by it.
    let writer = ferrolb_allocator::input::ingress_writer(&svc).map(str::to_string);
    svc.metadata.managed_fields = writer.map(|manager| {
        vec![ManagedFieldsEntry {
            manager: Some(manager),
            subresource: Some("status".into()),
            ..Default::default()
        }]
    });
    if let Some(a) = &mut svc.metadata.annotations {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    svc
}

fn namespace_from_meta(meta: PartialObjectMeta<Namespace>) -> Namespace {
    Namespace {
        metadata: meta.metadata,
        ..Default::default()
    }
}

fn map_event<A, B>(event: watcher::Event<A>, f: impl Fn(A) -> B) -> watcher::Event<B> {
    match event {
        watcher::Event::Apply(a) => watcher::Event::Apply(f(a)),
        watcher::Event::Delete(a) => watcher::Event::Delete(f(a)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(a) => watcher::Event::InitApply(f(a)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

fn failed(resource: Resource, e: &watcher::Error) -> Change {
    let name = resource.name();
    let message = ferrolb_kubernetes::error::explain_watch("controller", name, e);
    error!(resource = name, "cannot watch {name}: {message}");
    Change::Error(resource, message)
}

pub fn clear_error(health: &Health, resource: Resource) {
    let mut errors = health
        .watch_errors
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    errors.remove(resource.name());
}

/// One object's fate, after relists are accounted for.
pub enum Step<K, T> {
    Applied(T),
    Deleted(K),
}

/// What a watch has shown: every key, and the objects too while `keep` is set.
///
/// A relist streams through: each listed object is applied as it arrives (nothing is
/// buffered, so listing 10,000 Services never holds them all at once), and at its end
/// the keys it did not list are deleted.
///
/// Not kube-runtime's reflector store, which the speaker uses: a reflector keeps every
/// object and buffers a whole relist before swapping it in, while the controller keeps
/// only the Services' keys (the reconciler remembers the little it needs of each) and
/// hands each listed Service to the reconciler as it arrives.
pub struct Mirror<K, T> {
    objects: BTreeMap<K, Option<T>>,
    /// Keys seen by the relist in progress.
    relisted: Option<BTreeSet<K>>,
    listed: bool,
    keep: bool,
}

impl<K, T> Mirror<K, T> {
    /// Keeps the objects (for sources whose full list is needed again on every change).
    pub fn keeping() -> Self {
        Mirror {
            objects: BTreeMap::new(),
            relisted: None,
            listed: false,
            keep: true,
        }
    }

    /// Keeps only the keys (the reconciler remembers what it needs of the objects).
    pub fn keys_only() -> Self {
        Mirror {
            keep: false,
            ..Mirror::keeping()
        }
    }
}

impl<K: Ord + Clone, T: Clone> Mirror<K, T> {
    /// Applies one watch event; returns the steps it amounts to.
    pub fn apply(&mut self, event: watcher::Event<T>, key: impl Fn(&T) -> K) -> Vec<Step<K, T>> {
        match event {
            watcher::Event::Apply(obj) | watcher::Event::InitApply(obj) => {
                let k = key(&obj);
                if let Some(seen) = &mut self.relisted {
                    seen.insert(k.clone());
                }
                self.objects.insert(k, self.keep.then(|| obj.clone()));
                vec![Step::Applied(obj)]
            }
            watcher::Event::Delete(obj) => {
                let k = key(&obj);
                self.objects.remove(&k);
                vec![Step::Deleted(k)]
            }
            watcher::Event::Init => {
                self.relisted = Some(BTreeSet::new());
                Vec::new()
            }
            watcher::Event::InitDone => {
                self.listed = true;
                let seen = self.relisted.take().unwrap_or_default();
                let gone: Vec<K> = self
                    .objects
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for k in &gone {
                    self.objects.remove(k);
                }
                gone.into_iter().map(Step::Deleted).collect()
            }
        }
    }

    /// Whether the first list has completed.
    pub fn listed(&self) -> bool {
        self.listed
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// The objects held (with [`Mirror::keeping`]).
    pub fn objects(&self) -> Vec<T> {
        self.objects.values().flatten().cloned().collect()
    }
}
