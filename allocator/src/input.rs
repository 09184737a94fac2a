//! Kubernetes objects to allocator input. Pure: reads objects, returns plain data.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrolb_api::annotations::{self, lookup};
use ferrolb_api::manifests::{Located, Manifests};
use ferrolb_api::selector::Labels;
use ferrolb_api::validation::{CheckedPool, check_pools};
use ferrolb_api::{Family, IPAddressPool};
use k8s_openapi::api::core::v1::{Namespace, Service};

use crate::{FamilyPolicy, Plan, PoolConfig, PortKey, ServiceKey, ServiceRequest, Start, Traffic};

/// Everything allocation needs from a set of manifests, with the problems found, each
/// naming the file, document and object.
pub struct Prepared<'a> {
    pub pools: Vec<PoolConfig>,
    /// Sorted by pool name, like `pools`.
    pub checked: Vec<CheckedPool>,
    pub namespaces: BTreeMap<String, Labels>,
    pub requests: Vec<ServiceRequest>,
    /// Services that are ferrolb's but cannot be served, with the reason.
    pub invalid: BTreeMap<ServiceKey, String>,
    /// The Service objects behind `requests`, with where each was read.
    pub services: BTreeMap<ServiceKey, &'a Located<Service>>,
    pub problems: Vec<String>,
}

impl Prepared<'_> {
    /// The allocation of what was read: the one way from manifests to a plan, for
    /// `ferrolb plan`, standalone speakers, `ferrolb why` and the lab.
    pub fn plan(&self, start: Start) -> Plan {
        crate::plan(
            self.pools.clone(),
            self.namespaces.clone(),
            &self.requests,
            start,
        )
    }
}

/// Reads pools, namespaces and Services out of manifests for [`crate::plan`].
pub fn prepare(m: &Manifests) -> Prepared<'_> {
    prepare_for_class(m, annotations::LOAD_BALANCER_CLASS)
}

/// Like [`prepare`], serving `class` besides no class.
pub fn prepare_for_class<'a>(m: &'a Manifests, class: &str) -> Prepared<'a> {
    let mut problems = Vec::new();
    let pool_objects: Vec<IPAddressPool> = m.pools.iter().map(|p| (*p.object).clone()).collect();
    let (pools, checked) = pool_configs(&pool_objects);
    for c in &checked {
        let origin = m
            .pools
            .iter()
            .find(|p| p.object.metadata.name.as_deref() == Some(c.name.as_str()))
            .map(|p| p.origin.to_string())
            .unwrap_or_default();
        problems.extend(
            c.problems
                .iter()
                .map(|p| format!("{origin}: {}", p.message)),
        );
    }
    let namespace_objects: Vec<Namespace> =
        m.namespaces.iter().map(|n| (*n.object).clone()).collect();
    let mut requests = Vec::new();
    let mut invalid = BTreeMap::new();
    let mut services = BTreeMap::new();
    for located in &m.services {
        match translate_for_class(&located.object, class) {
            Translation::NotOurs => {}
            Translation::Request(r) => {
                services.insert(r.key.clone(), located);
                requests.push(*r);
            }
            Translation::Invalid { key, reason } => {
                problems.push(format!("{} (Service \"{key}\"): {reason}", located.origin));
                invalid.insert(key, reason);
            }
        }
    }
    Prepared {
        pools,
        checked,
        namespaces: namespace_labels(&namespace_objects),
        requests,
        invalid,
        services,
        problems,
    }
}

/// Allocator pools from IPAddressPools, with the result of checking them (whose
/// problems become status conditions and log lines).
pub fn pool_configs(pools: &[IPAddressPool]) -> (Vec<PoolConfig>, Vec<CheckedPool>) {
    let checked = check_pools(pools);
    let configs = checked
        .iter()
        .map(|c| {
            let pool = pools
                .iter()
                .find(|p| p.metadata.name.as_deref().unwrap_or_default() == c.name)
                .expect("every checked pool comes from the input");
            let alloc = pool.spec.service_allocation.clone().unwrap_or_default();
            PoolConfig {
                name: c.name.clone(),
                ranges: c.ranges.clone(),
                usable: c.usable(),
                problem: c.problems.first().map(|p| p.message.clone()),
                auto_assign: pool.spec.auto_assign(),
                avoid_buggy_ips: pool.spec.avoid_buggy_ips(),
                share_across_namespaces: pool.spec.allow_sharing_across_namespaces(),
                priority: alloc.priority,
                namespaces: alloc.namespaces,
                namespace_selectors: alloc.namespace_selectors,
                service_selectors: alloc.service_selectors,
            }
        })
        .collect();
    (configs, checked)
}

/// Namespace name to labels.
pub fn namespace_labels(namespaces: &[Namespace]) -> BTreeMap<String, Labels> {
    namespaces
        .iter()
        .filter_map(|ns| {
            let name = ns.metadata.name.clone()?;
            let mut labels = ns.metadata.labels.clone().unwrap_or_default();
            labels
                .entry("kubernetes.io/metadata.name".into())
                .or_insert_with(|| name.clone());
            Some((name, labels))
        })
        .collect()
}

/// How a Service enters allocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Translation {
    /// Not a LoadBalancer, or one of another `loadBalancerClass`: not ferrolb's.
    NotOurs,
    Request(Box<ServiceRequest>),
    /// Ours, but its spec or annotations cannot be honoured; stays pending.
    Invalid {
        key: ServiceKey,
        reason: String,
    },
}

/// Whether ferrolb serves a Service: type LoadBalancer, and no class or ferrolb's.
pub fn is_ours(svc: &Service) -> bool {
    is_ours_for_class(svc, annotations::LOAD_BALANCER_CLASS)
}

/// Like [`is_ours`], for a controller configured to serve `class` besides no class.
pub fn is_ours_for_class(svc: &Service, class: &str) -> bool {
    let Some(spec) = &svc.spec else { return false };
    spec.type_.as_deref() == Some("LoadBalancer")
        && spec
            .load_balancer_class
            .as_deref()
            .is_none_or(|c| c == class)
}

pub fn service_key(svc: &Service) -> ServiceKey {
    ServiceKey::new(
        svc.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        svc.metadata.name.clone().unwrap_or_default(),
    )
}

/// Reads what allocation needs from a Service.
pub fn translate(svc: &Service) -> Translation {
    translate_for_class(svc, annotations::LOAD_BALANCER_CLASS)
}

/// Like [`translate`], serving `class` besides no class.
pub fn translate_for_class(svc: &Service, class: &str) -> Translation {
    if !is_ours_for_class(svc, class) {
        return Translation::NotOurs;
    }
    let key = service_key(svc);
    match request(svc, key.clone()) {
        Ok(r) => Translation::Request(Box::new(r)),
        Err(reason) => Translation::Invalid { key, reason },
    }
}

fn request(svc: &Service, key: ServiceKey) -> Result<ServiceRequest, String> {
    let spec = svc.spec.clone().unwrap_or_default();
    let notes = svc.metadata.annotations.clone().unwrap_or_default();

    let mut requested: Vec<IpAddr> = Vec::new();
    let annotated = lookup(&notes, &annotations::LOAD_BALANCER_IPS_ALIASES);
    if let (Some((name, _)), Some(field)) = (
        annotated,
        spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()),
    ) {
        return Err(format!(
            "both annotation {name} and spec.loadBalancerIP ({field}) are set; keep only the annotation"
        ));
    }
    let (source, list) = match (annotated, spec.load_balancer_ip.as_deref()) {
        (Some((name, value)), _) => (format!("annotation {name}"), value.to_string()),
        (None, Some(ip)) => ("spec.loadBalancerIP".to_string(), ip.to_string()),
        (None, None) => (String::new(), String::new()),
    };
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let ip: IpAddr = item
            .parse()
            .map_err(|_| format!("{source}: {item:?} is not an IP address"))?;
        if let Some(other) = requested.iter().find(|r| Family::of(**r) == Family::of(ip)) {
            return Err(format!(
                "{source} names two {} addresses ({other}, {ip}); give at most one per family",
                Family::of(ip)
            ));
        }
        requested.push(ip);
    }

    let family_policy = match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack") => FamilyPolicy::SingleStack,
        Some("PreferDualStack") => FamilyPolicy::PreferDualStack,
        Some("RequireDualStack") => FamilyPolicy::RequireDualStack,
        Some(other) => {
            return Err(format!(
                "spec.ipFamilyPolicy {other:?} is not SingleStack, PreferDualStack or RequireDualStack"
            ));
        }
    };
    let mut families = Vec::new();
    for (i, f) in spec.ip_families.iter().flatten().enumerate() {
        families.push(
            Family::from_kubernetes(f)
                .ok_or_else(|| format!("spec.ipFamilies[{i}] {f:?} is not IPv4 or IPv6"))?,
        );
    }
    if families.is_empty() {
        // Kubernetes fills ipFamilies from the cluster's families; manifests written by
        // hand may not. Read them as a dual-stack cluster would: both families for the
        // dual-stack policies, else the requested IP's family, else IPv4.
        families = match family_policy {
            FamilyPolicy::SingleStack => requested.iter().map(|ip| Family::of(*ip)).collect(),
            _ => vec![Family::V4, Family::V6],
        };
        families.sort();
    }

    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| PortKey {
            port: p.port,
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
        })
        .collect();
    let traffic = match spec.external_traffic_policy.as_deref() {
        Some("Local") => Traffic::Local {
            selector: spec.selector.clone().unwrap_or_default(),
        },
        _ => Traffic::Cluster,
    };
    let current = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ing| ing.ip.as_deref()?.parse().ok())
        .collect();

    Ok(ServiceRequest {
        key,
        labels: svc.metadata.labels.clone().unwrap_or_default(),
        ports,
        sharing_key: lookup(&notes, &annotations::ALLOW_SHARED_IP_ALIASES)
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty()),
        requested,
        pool: lookup(&notes, &annotations::ADDRESS_POOL_ALIASES)
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty()),
        family_policy,
        families,
        traffic,
        current,
    })
}

/// The pool an IP in a Service's status belongs to, for announcing it (the allocator's
/// rule, for a Service that names no pool).
pub fn pool_of(configs: &[PoolConfig], ip: IpAddr) -> Option<&PoolConfig> {
    let holding = configs
        .iter()
        .filter(move |c| c.ranges.iter().any(|r| r.contains(ip)))
        .map(|c| (c, c));
    crate::pools::belongs_to(holding, None)
}

/// Who last wrote `status.loadBalancer.ingress`: the field manager whose managed fields
/// own it (a write of the status subresource takes the fields it sets from their
/// previous owner). An entry of the status subresource without its field list stands for
/// that owner (the controller keeps only it, to save memory). `None` when nobody does.
pub fn ingress_writer(svc: &Service) -> Option<&str> {
    svc.metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter(|m| {
            m.fields_v1.as_ref().is_none_or(|f| {
                f.0.get("f:status")
                    .and_then(|s| s.get("f:loadBalancer"))
                    .and_then(|l| l.get("f:ingress"))
                    .is_some()
            })
        })
        .filter_map(|m| m.manager.as_deref())
        .next_back()
}

/// The IPs in `status.loadBalancer.ingress`.
pub fn ingress_ips(svc: &Service) -> Vec<IpAddr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ServicePort, ServiceSpec};

    fn lb(annotations: &[(&str, &str)], spec: ServiceSpec) -> Service {
        let mut svc = Service::default();
        svc.metadata.name = Some("web".into());
        svc.metadata.namespace = Some("shop".into());
        svc.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        svc.spec = Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ..spec
        });
        svc
    }

    fn req(t: Translation) -> ServiceRequest {
        match t {
            Translation::Request(r) => *r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn other_types_and_classes_are_not_ours() {
        let mut svc = lb(&[], ServiceSpec::default());
        svc.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert_eq!(translate(&svc), Translation::NotOurs);
        let svc = lb(
            &[],
            ServiceSpec {
                load_balancer_class: Some("example.com/other".into()),
                ..Default::default()
            },
        );
        assert_eq!(translate(&svc), Translation::NotOurs);
        let svc = lb(
            &[],
            ServiceSpec {
                load_balancer_class: Some("ferrolb.io/lb".into()),
                ..Default::default()
            },
        );
        assert!(matches!(translate(&svc), Translation::Request(_)));
    }

    #[test]
    fn reads_annotations_in_every_spelling() {
        let r = req(translate(&lb(
            &[
                ("metallb.universe.tf/loadBalancerIPs", "10.0.0.5, fd00::5"),
                ("metallb.io/address-pool", "blue"),
                ("ferrolb.io/allow-shared-ip", "k"),
            ],
            ServiceSpec {
                ports: Some(vec![ServicePort {
                    port: 53,
                    protocol: Some("UDP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            },
        )));
        assert_eq!(
            r.requested,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(r.pool.as_deref(), Some("blue"));
        assert_eq!(r.sharing_key.as_deref(), Some("k"));
        assert_eq!(r.families, vec![Family::V4, Family::V6]);
        assert_eq!(r.ports[0].to_string(), "53/UDP");
    }

    #[test]
    fn deprecated_load_balancer_ip_is_honoured() {
        let r = req(translate(&lb(
            &[],
            ServiceSpec {
                load_balancer_ip: Some("fd00::9".into()),
                ..Default::default()
            },
        )));
        assert_eq!(r.requested, vec!["fd00::9".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.families, vec![Family::V6]);
    }

    #[test]
    fn ip_families_say_which_families_a_dual_stack_service_gets() {
        let prefer = |families: Option<Vec<String>>| ServiceSpec {
            ip_family_policy: Some("PreferDualStack".into()),
            ip_families: families,
            ..Default::default()
        };
        // What the API server writes on an IPv4-only cluster.
        let r = req(translate(&lb(&[], prefer(Some(vec!["IPv4".into()])))));
        assert_eq!(r.families, vec![Family::V4]);
        // A hand-written manifest, read as a dual-stack cluster would fill it.
        let r = req(translate(&lb(&[], prefer(None))));
        assert_eq!(r.families, vec![Family::V4, Family::V6]);
        let r = req(translate(&lb(&[], ServiceSpec::default())));
        assert_eq!(r.families, vec![]);
    }

    #[test]
    fn bad_requests_are_explained() {
        type Case<'a> = (Vec<(&'a str, &'a str)>, ServiceSpec, &'a str);
        let cases: Vec<Case> = vec![
            (
                vec![("ferrolb.io/loadBalancerIPs", "10.0.0.300")],
                ServiceSpec::default(),
                "annotation ferrolb.io/loadBalancerIPs: \"10.0.0.300\" is not an IP address",
            ),
            (
                vec![("ferrolb.io/loadBalancerIPs", "10.0.0.1,10.0.0.2")],
                ServiceSpec::default(),
                "names two IPv4 addresses",
            ),
            (
                vec![("ferrolb.io/loadBalancerIPs", "10.0.0.1")],
                ServiceSpec {
                    load_balancer_ip: Some("10.0.0.2".into()),
                    ..Default::default()
                },
                "keep only the annotation",
            ),
            (
                vec![],
                ServiceSpec {
                    ip_families: Some(vec!["IPv5".into()]),
                    ..Default::default()
                },
                "spec.ipFamilies[0] \"IPv5\"",
            ),
        ];
        for (notes, spec, want) in cases {
            match translate(&lb(&notes, spec)) {
                Translation::Invalid { key, reason } => {
                    assert_eq!(key.to_string(), "shop/web");
                    assert!(reason.contains(want), "{reason}");
                }
                other => panic!("expected invalid for {want}, got {other:?}"),
            }
        }
    }
}
