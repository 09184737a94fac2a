//! Cilium's LB-IPAM and L2 announcements turned into ferrolb's configuration (pure):
//! `CiliumLoadBalancerIPPool` (cilium.io v2alpha1 and v2) becomes an IPAddressPool,
//! `CiliumL2AnnouncementPolicy` an L2Advertisement. Cilium's BGP objects, and what its
//! pools and policies can say that ferrolb's cannot, are listed with the reason.

use std::collections::BTreeMap;

use ferrolb_api::selector;
use ferrolb_api::{
    AddressEntry, IPAddressPool, IPAddressPoolSpec, L2Advertisement, L2AdvertisementSpec,
    ServiceAllocation,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde_json::Value;

use super::conversion::{Conversion, Document, Finding, Meta, NO_BGP, cidr_without_ends};

/// The kinds read from the cluster (cilium.io holds many others, some numerous).
pub const KINDS: [&str; 5] = [
    "CiliumLoadBalancerIPPool",
    "CiliumL2AnnouncementPolicy",
    "CiliumBGPPeeringPolicy",
    "CiliumBGPClusterConfig",
    "CiliumBGPAdvertisement",
];

/// Labels Cilium gives every Service for its selectors; ferrolb's selectors see only
/// the Service's own labels.
const NAMESPACE_LABEL: &str = "io.kubernetes.service.namespace";
const NAME_LABEL: &str = "io.kubernetes.service.name";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpec {
    #[serde(default)]
    blocks: Vec<Block>,
    /// The name of `blocks` before Cilium 1.15.
    #[serde(default)]
    cidrs: Vec<Block>,
    service_selector: Option<LabelSelector>,
    #[serde(default)]
    disabled: bool,
    allow_first_last_i_ps: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct Block {
    cidr: Option<String>,
    start: Option<String>,
    stop: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicySpec {
    service_selector: Option<LabelSelector>,
    node_selector: Option<LabelSelector>,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default)]
    external_i_ps: bool,
    #[serde(default)]
    load_balancer_i_ps: bool,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// Converts every Cilium document among `docs`; other documents are ignored.
pub fn convert(docs: &[Document]) -> Conversion {
    let mut c = Conversion::default();
    let mut policies = 0;
    for doc in docs {
        let v = &doc.value;
        let api_version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        if !api_version.starts_with("cilium.io/") {
            continue;
        }
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
        let meta: Meta = match v.get("metadata").map(|m| serde_json::from_value(m.clone())) {
            Some(Ok(m)) => m,
            _ => {
                c.errors
                    .push(format!("{}: {kind}: metadata.name is missing", doc.origin));
                continue;
            }
        };
        let what = format!("{kind} \"{}\"", meta.name);
        let spec = v
            .get("spec")
            .cloned()
            .unwrap_or(Value::Object(Default::default()));
        match kind {
            "CiliumLoadBalancerIPPool" => {
                c.read += 1;
                match serde_json::from_value::<PoolSpec>(spec) {
                    Ok(spec) => {
                        if let Some(pool) = convert_pool(&what, meta, spec, &mut c) {
                            c.pools.push(pool);
                        }
                    }
                    Err(e) => c.errors.push(format!("{}: {what}: spec: {e}", doc.origin)),
                }
            }
            "CiliumL2AnnouncementPolicy" => {
                c.read += 1;
                policies += 1;
                match serde_json::from_value::<PolicySpec>(spec) {
                    Ok(spec) => {
                        if let Some(ad) = convert_policy(&what, &meta.name, spec, &mut c) {
                            c.advertisements.push(ad);
                        }
                    }
                    Err(e) => c.errors.push(format!("{}: {what}: spec: {e}", doc.origin)),
                }
            }
            k if k.starts_with("CiliumBGP") => {
                c.read += 1;
                c.not_carried.push(Finding {
                    what,
                    why: NO_BGP.into(),
                });
            }
            _ => {}
        }
    }
    if policies == 0 && !c.pools.is_empty() {
        c.notes.push(
            "no CiliumL2AnnouncementPolicy: Cilium announces these IPs by BGP or not at all, \
             so no L2Advertisement is written; add one to have ferrolb answer ARP/NDP for them"
                .into(),
        );
    }
    c.sort();
    c
}

fn convert_pool(
    what: &str,
    meta: Meta,
    spec: PoolSpec,
    c: &mut Conversion,
) -> Option<IPAddressPool> {
    for field in spec.other.keys() {
        c.not_carried.push(Finding {
            what: format!("{what} spec.{field}"),
            why: "not a field of CiliumLoadBalancerIPPool that ferrolb knows".into(),
        });
    }
    let reserve_ends = spec.allow_first_last_i_ps.as_deref() == Some("No");
    let (field, blocks) = if spec.blocks.is_empty() {
        ("cidrs", spec.cidrs)
    } else {
        ("blocks", spec.blocks)
    };
    let mut ok = true;
    let mut addresses = Vec::new();
    for (i, block) in blocks.iter().enumerate() {
        match block_entry(block, reserve_ends) {
            Ok(entry) => addresses.push(AddressEntry(entry)),
            Err(e) => {
                c.errors.push(format!("{what}: spec.{field}[{i}]: {e}"));
                ok = false;
            }
        }
    }
    if addresses.is_empty() && ok {
        c.errors.push(format!("{what}: spec.blocks is empty"));
        ok = false;
    }
    for (i, entry) in addresses.iter().enumerate() {
        if let Err(e) = ferrolb_api::address::parse_range(&entry.0) {
            c.errors.push(format!("{what}: spec.{field}[{i}]: {e}"));
            ok = false;
        }
    }
    let mut allocation = ServiceAllocation::default();
    if let Some(sel) = spec.service_selector {
        match split_selector(sel) {
            Ok((namespaces, rest)) => {
                allocation.namespaces = namespaces;
                if let Some(rest) = rest {
                    if let Err(e) = selector::validate(&rest) {
                        c.errors.push(format!("{what}: spec.serviceSelector.{e}"));
                        ok = false;
                    }
                    allocation.service_selectors = vec![rest];
                }
            }
            Err(why) => {
                c.errors
                    .push(format!("{what}: spec.serviceSelector: {why}"));
                ok = false;
            }
        }
    }
    if spec.disabled {
        c.notes.push(format!(
            "{what}: disabled (no new IPs) becomes autoAssign: false: ferrolb still gives its \
             addresses to Services that ask for one by IP or by pool"
        ));
    }
    if !ok {
        return None;
    }
    let mut pool = IPAddressPool::new(
        &meta.name,
        IPAddressPoolSpec {
            addresses,
            auto_assign: spec.disabled.then_some(false),
            service_allocation: (allocation != ServiceAllocation::default()).then_some(allocation),
            ..Default::default()
        },
    );
    pool.metadata = ObjectMeta {
        name: Some(meta.name),
        labels: meta.labels.filter(|l| !l.is_empty()),
        ..Default::default()
    };
    Some(pool)
}

/// One block as a `spec.addresses` entry; with `reserve_ends` (allowFirstLastIPs: No)
/// a CIDR without its first and last address, as Cilium reserves them.
fn block_entry(block: &Block, reserve_ends: bool) -> Result<String, String> {
    match (&block.cidr, &block.start, &block.stop) {
        (Some(cidr), None, None) if reserve_ends => cidr_without_ends(cidr),
        (Some(cidr), None, None) => Ok(cidr.clone()),
        (None, Some(start), Some(stop)) => Ok(format!("{start}-{stop}")),
        (None, Some(start), None) => Ok(start.clone()),
        _ => Err("a block has either cidr, or start (and stop)".into()),
    }
}

/// Cilium's service selector, split into the namespaces it names through Cilium's
/// `io.kubernetes.service.namespace` label, and the selector on the Service's own labels
/// that is left (none when nothing is).
fn split_selector(sel: LabelSelector) -> Result<(Vec<String>, Option<LabelSelector>), String> {
    let mut namespaces = Vec::new();
    let mut labels = sel.match_labels.unwrap_or_default();
    if let Some(ns) = labels.remove(NAMESPACE_LABEL) {
        namespaces.push(ns);
    }
    let mut expressions = Vec::new();
    for req in sel.match_expressions.unwrap_or_default() {
        if req.key == NAMESPACE_LABEL && req.operator == "In" {
            namespaces.extend(req.values.clone().unwrap_or_default());
        } else if req.key == NAMESPACE_LABEL || req.key == NAME_LABEL {
            return Err(format!(
                "{} {} has no ferrolb equivalent (ferrolb pools select namespaces by name or \
                 label, and Services by their own labels)",
                req.key, req.operator
            ));
        } else {
            expressions.push(req);
        }
    }
    if labels.contains_key(NAME_LABEL) {
        return Err(format!(
            "{NAME_LABEL} has no ferrolb equivalent: label the Service and select that label"
        ));
    }
    let rest = LabelSelector {
        match_labels: (!labels.is_empty()).then_some(labels),
        match_expressions: (!expressions.is_empty()).then_some(expressions),
    };
    let rest = (rest != LabelSelector::default()).then_some(rest);
    Ok((namespaces, rest))
}

fn convert_policy(
    what: &str,
    name: &str,
    spec: PolicySpec,
    c: &mut Conversion,
) -> Option<L2Advertisement> {
    for field in spec.other.keys() {
        c.not_carried.push(Finding {
            what: format!("{what} spec.{field}"),
            why: "not a field of CiliumL2AnnouncementPolicy that ferrolb knows".into(),
        });
    }
    if spec.external_i_ps {
        c.not_carried.push(Finding {
            what: format!("{what} spec.externalIPs"),
            why: "ferrolb announces LoadBalancer IPs only, not spec.externalIPs".into(),
        });
    }
    if !spec.load_balancer_i_ps {
        c.notes.push(format!(
            "{what}: loadBalancerIPs is not true: it announces no LoadBalancer IP, so no \
             L2Advertisement is written for it"
        ));
        return None;
    }
    if spec.service_selector.is_some() {
        c.not_carried.push(Finding {
            what: format!("{what} spec.serviceSelector"),
            why: "ferrolb announces every Service of the pools an L2Advertisement names: the \
                  converted advertisement announces all pools"
                .into(),
        });
    }
    let mut interfaces = Vec::new();
    for (i, pattern) in spec.interfaces.iter().enumerate() {
        let name = pattern.trim_start_matches('^').trim_end_matches('$');
        if !name.is_empty()
            && name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            interfaces.push(name.to_string());
        } else {
            c.not_carried.push(Finding {
                what: format!("{what} spec.interfaces[{i}] ({pattern:?})"),
                why: "Cilium matches interfaces by regular expression, ferrolb by name: list \
                      the names in the L2Advertisement's interfaces"
                    .into(),
            });
        }
    }
    let node_selectors: Vec<LabelSelector> = spec.node_selector.into_iter().collect();
    for s in &node_selectors {
        if let Err(e) = selector::validate(s) {
            c.errors.push(format!("{what}: spec.nodeSelector.{e}"));
            return None;
        }
    }
    let mut ad = L2Advertisement::new(
        name,
        L2AdvertisementSpec {
            node_selectors,
            interfaces,
            ..Default::default()
        },
    );
    ad.metadata = ObjectMeta {
        name: Some(name.to_string()),
        ..Default::default()
    };
    Some(ad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(yaml: &str) -> Vec<Document> {
        ferrolb_api::manifests::documents("cilium.yaml", yaml)
            .unwrap()
            .into_iter()
            .map(|value| Document {
                origin: "cilium.yaml".into(),
                value,
            })
            .collect()
    }

    #[test]
    fn pools_and_policies_convert_and_the_rest_is_listed() {
        let c = convert(&docs(
            r#"
apiVersion: cilium.io/v2alpha1
kind: CiliumLoadBalancerIPPool
metadata: {name: blue, labels: {color: blue}}
spec:
  blocks:
    - cidr: 10.0.10.0/24
    - cidr: "2004::/64"
    - {start: 20.0.20.100, stop: 20.0.20.200}
    - start: 1.2.3.4
  serviceSelector:
    matchLabels: {io.kubernetes.service.namespace: shop, tier: edge}
---
apiVersion: cilium.io/v2
kind: CiliumLoadBalancerIPPool
metadata: {name: ends}
spec:
  allowFirstLastIPs: "No"
  disabled: true
  blocks: [{cidr: 192.168.5.0/24}, {cidr: 192.168.6.0/31}, {cidr: "fd00::/120"}]
---
apiVersion: cilium.io/v2alpha1
kind: CiliumL2AnnouncementPolicy
metadata: {name: edge}
spec:
  nodeSelector: {matchLabels: {role: edge}}
  interfaces: ["^eth0$", "^eth[1-9]+"]
  serviceSelector: {matchLabels: {app: web}}
  externalIPs: true
  loadBalancerIPs: true
---
apiVersion: cilium.io/v2alpha1
kind: CiliumBGPPeeringPolicy
metadata: {name: tor}
spec: {}
"#,
        ));
        assert_eq!(c.errors, Vec::<String>::new());
        let blue = &c.pools[0].spec;
        let entries: Vec<&str> = blue.addresses.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(
            entries,
            [
                "10.0.10.0/24",
                "2004::/64",
                "20.0.20.100-20.0.20.200",
                "1.2.3.4"
            ]
        );
        let allocation = blue.service_allocation.as_ref().unwrap();
        assert_eq!(allocation.namespaces, ["shop"]);
        assert_eq!(
            allocation.service_selectors[0].match_labels,
            Some([("tier".to_string(), "edge".to_string())].into())
        );
        let ends = &c.pools[1].spec;
        let entries: Vec<&str> = ends.addresses.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(
            entries,
            [
                "192.168.5.1-192.168.5.254",
                "192.168.6.0/31",
                "fd00::1-fd00::fe"
            ]
        );
        assert_eq!(ends.auto_assign, Some(false));
        let ad = &c.advertisements[0].spec;
        assert_eq!(ad.interfaces, ["eth0"]);
        assert!(ad.ip_address_pools.is_empty(), "all pools");
        let found: Vec<&str> = c.not_carried.iter().map(|f| f.what.as_str()).collect();
        assert_eq!(
            found,
            [
                "CiliumL2AnnouncementPolicy \"edge\" spec.externalIPs",
                "CiliumL2AnnouncementPolicy \"edge\" spec.serviceSelector",
                "CiliumL2AnnouncementPolicy \"edge\" spec.interfaces[1] (\"^eth[1-9]+\")",
                "CiliumBGPPeeringPolicy \"tor\"",
            ]
        );
    }

    #[test]
    fn selectors_on_service_names_are_refused_by_name() {
        let c = convert(&docs(
            "apiVersion: cilium.io/v2alpha1\nkind: CiliumLoadBalancerIPPool\nmetadata: {name: p}\n\
             spec: {blocks: [{cidr: 10.0.0.0/28}], serviceSelector: {matchLabels: {io.kubernetes.service.name: web}}}\n",
        ));
        assert_eq!(c.pools.len(), 0);
        assert!(
            c.errors[0].starts_with(
                "CiliumLoadBalancerIPPool \"p\": spec.serviceSelector: io.kubernetes.service.name"
            ),
            "{:?}",
            c.errors
        );
    }
}
