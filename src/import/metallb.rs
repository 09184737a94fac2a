//! MetalLB's configuration turned into ferrolb's (pure): the custom resources of
//! MetalLB 0.13 and later (`metallb.io`), the `AddressPool` kind of 0.12/0.13, and the
//! legacy `config` format of MetalLB 0.12 and earlier, as the ConfigMap, a bare file, or
//! the chart's `configInline` value. Whatever has no ferrolb equivalent is listed with the
//! reason, never dropped in silence.

use std::collections::{BTreeMap, BTreeSet};

use ferrolb_api::selector::{self, Labels};
use ferrolb_api::{
    AddressEntry, IPAddressPool, IPAddressPoolSpec, L2Advertisement, L2AdvertisementSpec,
    ServiceAllocation,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use serde_json::Value;

use super::conversion::Meta;
use super::conversion::NO_BGP;
pub use super::conversion::{Conversion, Document, Finding};

/// Converts every MetalLB document among `docs`; other documents are ignored (the
/// caller reads Services and Namespaces from them).
pub fn convert(docs: &[Document]) -> Conversion {
    let mut c = Conversion::default();
    let mut pools: Vec<Pool> = Vec::new();
    let mut l2: Vec<Advertisement> = Vec::new();
    let mut bgp: Vec<Advertisement> = Vec::new();
    for doc in docs {
        read_document(doc, &mut c, &mut pools, &mut l2, &mut bgp);
    }
    assemble(&mut c, pools, l2, bgp);
    c
}

/// A MetalLB pool, whatever form it was read from.
struct Pool {
    /// `IPAddressPool "metallb-system/name"`, for messages.
    what: String,
    name: String,
    labels: Labels,
    addresses: Vec<String>,
    auto_assign: Option<bool>,
    avoid_buggy_ips: bool,
    allocation: Option<Allocation>,
    /// A legacy pool's own protocol: it is its own advertisement.
    legacy_protocol: Option<String>,
}

/// An L2Advertisement or a BGPAdvertisement: which pools it announces.
struct Advertisement {
    what: String,
    name: String,
    pools: Vec<String>,
    pool_selectors: Vec<LabelSelector>,
    node_selectors: Vec<LabelSelector>,
    interfaces: Vec<String>,
}

impl Advertisement {
    /// MetalLB: with neither names nor selectors, every pool.
    fn announces(&self, pool: &Pool) -> bool {
        (self.pools.is_empty() && self.pool_selectors.is_empty())
            || self.pools.contains(&pool.name)
            || self
                .pool_selectors
                .iter()
                .any(|s| selector::matches(s, &pool.labels))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpec {
    #[serde(default)]
    addresses: Vec<String>,
    auto_assign: Option<bool>,
    #[serde(default, rename = "avoidBuggyIPs")]
    avoid_buggy_ips: bool,
    service_allocation: Option<Allocation>,
    /// `AddressPool` (0.12/0.13) only.
    protocol: Option<String>,
    #[serde(default)]
    bgp_advertisements: Vec<Value>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize, Clone)]
#[serde(rename_all = "camelCase")]
struct Allocation {
    #[serde(default)]
    priority: i64,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    namespace_selectors: Vec<LabelSelector>,
    #[serde(default)]
    service_selectors: Vec<LabelSelector>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AdvertisementSpec {
    #[serde(default)]
    ip_address_pools: Vec<String>,
    #[serde(default)]
    ip_address_pool_selectors: Vec<LabelSelector>,
    #[serde(default)]
    node_selectors: Vec<LabelSelector>,
    #[serde(default)]
    interfaces: Vec<String>,
    #[serde(default)]
    service_selectors: Vec<LabelSelector>,
    #[serde(default)]
    preferred_node_selectors: Vec<Value>,
    /// BGPAdvertisement fields (aggregation, communities, peers, localPref): BGP only.
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// The legacy configuration (MetalLB 0.12 and earlier).
#[derive(Deserialize)]
struct LegacyConfig {
    #[serde(default)]
    peers: Vec<Value>,
    #[serde(default, rename = "bgp-communities")]
    bgp_communities: BTreeMap<String, Value>,
    #[serde(default, rename = "address-pools")]
    pools: Vec<LegacyPool>,
    #[serde(default, rename = "bfd-profiles")]
    bfd_profiles: Vec<Value>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct LegacyPool {
    #[serde(default)]
    name: String,
    #[serde(default)]
    protocol: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(rename = "auto-assign")]
    auto_assign: Option<bool>,
    #[serde(default, rename = "avoid-buggy-ips")]
    avoid_buggy_ips: bool,
    #[serde(default, rename = "bgp-advertisements")]
    bgp_advertisements: Vec<Value>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

fn read_document(
    doc: &Document,
    c: &mut Conversion,
    pools: &mut Vec<Pool>,
    l2: &mut Vec<Advertisement>,
    bgp: &mut Vec<Advertisement>,
) {
    let v = &doc.value;
    let api_version = v.get("apiVersion").and_then(Value::as_str).unwrap_or("");
    let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    if api_version.is_empty() && kind.is_empty() {
        // A bare legacy config file, or the chart's values with configInline.
        if let Some(inline) = v.get("configInline") {
            read_legacy(&format!("{}: configInline", doc.origin), inline, c, pools);
        } else if v.get("address-pools").is_some() || v.get("peers").is_some() {
            read_legacy(&format!("{}: legacy config", doc.origin), v, c, pools);
        }
        return;
    }
    if api_version == "v1" && kind == "ConfigMap" {
        let meta: Option<Meta> = v
            .get("metadata")
            .and_then(|m| serde_json::from_value(m.clone()).ok());
        let name = meta.as_ref().map_or("", |m| m.name.as_str()).to_string();
        let config = v.get("data").and_then(|d| d.get("config"));
        if let Some(text) = config.and_then(Value::as_str) {
            let what = format!("{}: ConfigMap {name:?} data.config", doc.origin);
            match parse_yaml(text) {
                Ok(value) => read_legacy(&what, &value, c, pools),
                Err(e) => c.errors.push(format!("{what}: not YAML: {e}")),
            }
        }
        return;
    }
    if group != "metallb.io" {
        return;
    }
    c.read += 1;
    let meta: Meta = match v.get("metadata").map(|m| serde_json::from_value(m.clone())) {
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            c.errors
                .push(format!("{}: {kind}: metadata: {e}", doc.origin));
            return;
        }
        None => {
            c.errors
                .push(format!("{}: {kind}: metadata.name is missing", doc.origin));
            return;
        }
    };
    let what = match &meta.namespace {
        Some(ns) => format!("{kind} \"{ns}/{}\"", meta.name),
        None => format!("{kind} \"{}\"", meta.name),
    };
    let spec = v
        .get("spec")
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    match kind {
        "IPAddressPool" | "AddressPool" => match serde_json::from_value::<PoolSpec>(spec) {
            Ok(spec) => {
                if kind == "AddressPool" {
                    c.notes.push(format!(
                        "{what}: MetalLB's deprecated AddressPool is converted as an IPAddressPool \
                         and, for protocol layer2, an L2Advertisement of its own"
                    ));
                }
                for field in spec.other.keys() {
                    c.not_carried.push(Finding {
                        what: format!("{what} spec.{field}"),
                        why: "not a field of MetalLB's IPAddressPool that ferrolb knows".into(),
                    });
                }
                if !spec.bgp_advertisements.is_empty() {
                    c.not_carried.push(Finding {
                        what: format!("{what} spec.bgpAdvertisements"),
                        why: NO_BGP.into(),
                    });
                }
                pools.push(Pool {
                    what,
                    name: meta.name,
                    labels: meta.labels.unwrap_or_default(),
                    addresses: spec.addresses,
                    auto_assign: spec.auto_assign,
                    avoid_buggy_ips: spec.avoid_buggy_ips,
                    allocation: spec.service_allocation,
                    legacy_protocol: (kind == "AddressPool")
                        .then(|| spec.protocol.unwrap_or_default()),
                });
            }
            Err(e) => c.errors.push(format!("{}: {what}: spec: {e}", doc.origin)),
        },
        "L2Advertisement" | "BGPAdvertisement" => {
            match serde_json::from_value::<AdvertisementSpec>(spec) {
                Ok(spec) => {
                    let is_l2 = kind == "L2Advertisement";
                    if is_l2 {
                        if !spec.service_selectors.is_empty() {
                            c.not_carried.push(Finding {
                                what: format!("{what} spec.serviceSelectors"),
                                why: "ferrolb announces every Service of the pools an \
                                      L2Advertisement names; split the pool to announce \
                                      some Services only"
                                    .into(),
                            });
                        }
                        if !spec.preferred_node_selectors.is_empty() {
                            c.not_carried.push(Finding {
                                what: format!("{what} spec.preferredNodeSelectors"),
                                why: "ferrolb has no node preference: every eligible node \
                                      may own an IP (nodeSelectors are carried over)"
                                    .into(),
                            });
                        }
                        for field in spec.other.keys() {
                            c.not_carried.push(Finding {
                                what: format!("{what} spec.{field}"),
                                why: "not a field of MetalLB's L2Advertisement that ferrolb \
                                      knows"
                                    .into(),
                            });
                        }
                    } else {
                        c.not_carried.push(Finding {
                            what: what.clone(),
                            why: NO_BGP.into(),
                        });
                    }
                    let ad = Advertisement {
                        what,
                        name: meta.name,
                        pools: spec.ip_address_pools,
                        pool_selectors: spec.ip_address_pool_selectors,
                        node_selectors: spec.node_selectors,
                        interfaces: spec.interfaces,
                    };
                    if is_l2 { l2.push(ad) } else { bgp.push(ad) }
                }
                Err(e) => c.errors.push(format!("{}: {what}: spec: {e}", doc.origin)),
            }
        }
        "BGPPeer" | "Community" => c.not_carried.push(Finding {
            what,
            why: NO_BGP.into(),
        }),
        "BFDProfile" => c.not_carried.push(Finding {
            what,
            why: "BFD serves MetalLB's BGP sessions; ferrolb has no BGP (its membership \
                  detects a dead node on its own)"
                .into(),
        }),
        "ServiceL2Status" | "ServiceBGPStatus" | "ConfigurationState" => {
            c.read -= 1; // status MetalLB writes, not configuration
        }
        _ => c.not_carried.push(Finding {
            what,
            why: "a MetalLB kind ferrolb does not know".into(),
        }),
    }
}

fn parse_yaml(text: &str) -> Result<Value, String> {
    serde_saphyr::from_str::<Value>(text).map_err(|e| e.to_string())
}

fn read_legacy(what: &str, v: &Value, c: &mut Conversion, pools: &mut Vec<Pool>) {
    let config: LegacyConfig = match serde_json::from_value(v.clone()) {
        Ok(config) => config,
        Err(e) => {
            c.errors.push(format!("{what}: {e}"));
            return;
        }
    };
    for (i, _) in config.peers.iter().enumerate() {
        c.not_carried.push(Finding {
            what: format!("{what}: peers[{i}]"),
            why: NO_BGP.into(),
        });
    }
    for name in config.bgp_communities.keys() {
        c.not_carried.push(Finding {
            what: format!("{what}: bgp-communities.{name}"),
            why: NO_BGP.into(),
        });
    }
    for (i, _) in config.bfd_profiles.iter().enumerate() {
        c.not_carried.push(Finding {
            what: format!("{what}: bfd-profiles[{i}]"),
            why: "BFD serves MetalLB's BGP sessions; ferrolb has no BGP".into(),
        });
    }
    for field in config.other.keys() {
        c.not_carried.push(Finding {
            what: format!("{what}: {field}"),
            why: "not a key of MetalLB's legacy configuration that ferrolb knows".into(),
        });
    }
    for (i, p) in config.pools.into_iter().enumerate() {
        c.read += 1;
        let pool_what = format!("{what}: address-pools[{i}] ({:?})", p.name);
        if p.name.is_empty() {
            c.errors.push(format!("{pool_what}: name is missing"));
            continue;
        }
        let name = kubernetes_name(&p.name);
        if name != p.name {
            c.notes.push(format!(
                "{pool_what}: renamed {name:?}, as MetalLB's own converter does (a Kubernetes \
                 name); Services asking for {:?} by annotation must ask for {name:?}",
                p.name
            ));
        }
        for field in p.other.keys() {
            c.not_carried.push(Finding {
                what: format!("{pool_what}: {field}"),
                why: "not a key of a legacy address pool that ferrolb knows".into(),
            });
        }
        // A bgp pool is left behind whole, below.
        if !p.bgp_advertisements.is_empty() && p.protocol != "bgp" {
            c.not_carried.push(Finding {
                what: format!("{pool_what}: bgp-advertisements"),
                why: NO_BGP.into(),
            });
        }
        pools.push(Pool {
            what: pool_what,
            name,
            labels: Labels::new(),
            addresses: p.addresses,
            auto_assign: p.auto_assign,
            avoid_buggy_ips: p.avoid_buggy_ips,
            allocation: None,
            legacy_protocol: Some(p.protocol),
        });
    }
}

/// A legacy pool name as a Kubernetes object name, as MetalLB's configmaptocrs makes it:
/// lower case, other characters than letters, digits, '-' and '.' become '-', no leading
/// or trailing punctuation, at most 63 characters.
fn kubernetes_name(name: &str) -> String {
    let mapped: String = name
        .to_lowercase()
        .chars()
        .map(|ch| {
            if ch.is_ascii_alphanumeric() || ch == '-' || ch == '.' {
                ch
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_matches(|ch: char| !ch.is_ascii_alphanumeric());
    let mut out: String = trimmed.chars().take(63).collect();
    while out.ends_with(|ch: char| !ch.is_ascii_alphanumeric()) {
        out.pop();
    }
    out
}

fn assemble(c: &mut Conversion, pools: Vec<Pool>, l2: Vec<Advertisement>, bgp: Vec<Advertisement>) {
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    for pool in &pools {
        if let Some(first) = names.insert(pool.name.clone(), pool.what.clone()) {
            c.errors.push(format!(
                "{} and {first} are both named {:?}: ferrolb's pools are cluster-wide, one \
                 name each; rename one",
                pool.what, pool.name
            ));
        }
    }
    for pool in pools {
        let by_l2 = match &pool.legacy_protocol {
            Some(protocol) if protocol == "layer2" => true,
            Some(protocol) if protocol == "bgp" => false,
            Some(protocol) => {
                c.errors.push(format!(
                    "{}: protocol {protocol:?} is neither layer2 nor bgp",
                    pool.what
                ));
                continue;
            }
            None => l2.iter().any(|a| a.announces(&pool)),
        };
        let by_bgp = pool.legacy_protocol.as_deref() == Some("bgp")
            || bgp.iter().any(|a| a.announces(&pool));
        if by_bgp && !by_l2 {
            c.not_carried.push(Finding {
                what: pool.what.clone(),
                why: format!(
                    "MetalLB announces it by BGP only; {NO_BGP}. Its Services would get \
                     other addresses"
                ),
            });
            c.bgp_only_pools.insert(
                pool.name.clone(),
                pool.addresses.iter().cloned().map(AddressEntry).collect(),
            );
            continue;
        }
        if !by_l2 {
            c.notes.push(format!(
                "{}: no L2Advertisement announces it in MetalLB; none does in ferrolb either \
                 (its addresses are given out, not answered for)",
                pool.what
            ));
        }
        if let Some(converted) = convert_pool(&pool, c) {
            if pool.legacy_protocol.as_deref() == Some("layer2") {
                c.advertisements.push(L2Advertisement::new(
                    &converted.metadata.name.clone().unwrap_or_default(),
                    L2AdvertisementSpec {
                        ip_address_pools: vec![pool.name.clone()],
                        ..Default::default()
                    },
                ));
            }
            c.pools.push(converted);
        }
    }
    let mut ad_names = BTreeSet::new();
    for ad in &l2 {
        if !ad_names.insert(ad.name.clone()) {
            c.errors.push(format!(
                "{}: another L2Advertisement is named {:?}: ferrolb's are cluster-wide, one \
                 name each; rename one",
                ad.what, ad.name
            ));
            continue;
        }
        if let Some(converted) = convert_advertisement(ad, c) {
            c.advertisements.push(converted);
        }
    }
    c.sort();
}

fn check_selectors(
    what: &str,
    field: &str,
    selectors: &[LabelSelector],
    c: &mut Conversion,
) -> bool {
    let mut ok = true;
    for (i, s) in selectors.iter().enumerate() {
        if let Err(e) = selector::validate(s) {
            c.errors.push(format!("{what}: {field}[{i}].{e}"));
            ok = false;
        }
    }
    ok
}

fn convert_pool(pool: &Pool, c: &mut Conversion) -> Option<IPAddressPool> {
    let mut ok = true;
    if pool.addresses.is_empty() {
        c.errors
            .push(format!("{}: spec.addresses is empty", pool.what));
        ok = false;
    }
    if pool.addresses.len() > ferrolb_api::pool::MAX_ADDRESSES {
        c.errors.push(format!(
            "{}: spec.addresses has {} entries; ferrolb takes at most {} (join adjacent ones \
             into ranges)",
            pool.what,
            pool.addresses.len(),
            ferrolb_api::pool::MAX_ADDRESSES
        ));
        ok = false;
    }
    for (i, entry) in pool.addresses.iter().enumerate() {
        if let Err(e) = ferrolb_api::address::parse_range(entry) {
            c.errors
                .push(format!("{}: spec.addresses[{i}]: {e}", pool.what));
            ok = false;
        }
    }
    let allocation = match &pool.allocation {
        None => None,
        Some(a) => {
            for field in a.other.keys() {
                c.not_carried.push(Finding {
                    what: format!("{} spec.serviceAllocation.{field}", pool.what),
                    why: "not a field of MetalLB's serviceAllocation that ferrolb knows".into(),
                });
            }
            ok &= check_selectors(
                &pool.what,
                "spec.serviceAllocation.namespaceSelectors",
                &a.namespace_selectors,
                c,
            );
            ok &= check_selectors(
                &pool.what,
                "spec.serviceAllocation.serviceSelectors",
                &a.service_selectors,
                c,
            );
            let priority = match i32::try_from(a.priority) {
                Ok(0) => None,
                Ok(p) if p > 0 => Some(p),
                _ => {
                    c.notes.push(format!(
                        "{}: spec.serviceAllocation.priority {} is not positive: MetalLB ranks \
                         it with the pools that have none, and so does ferrolb",
                        pool.what, a.priority
                    ));
                    None
                }
            };
            Some(ServiceAllocation {
                priority,
                namespaces: dedup(
                    &pool.what,
                    "spec.serviceAllocation.namespaces",
                    &a.namespaces,
                    c,
                ),
                namespace_selectors: a.namespace_selectors.clone(),
                service_selectors: a.service_selectors.clone(),
            })
        }
    };
    if !ok {
        return None;
    }
    let mut converted = IPAddressPool::new(
        &pool.name,
        IPAddressPoolSpec {
            addresses: pool.addresses.iter().cloned().map(AddressEntry).collect(),
            auto_assign: pool.auto_assign.filter(|a| !a),
            avoid_buggy_ips: pool.avoid_buggy_ips.then_some(true),
            service_allocation: allocation,
            ..Default::default()
        },
    );
    converted.metadata = object_meta(&pool.name, &pool.labels);
    Some(converted)
}

/// Entries once each, in their order; a repeat is noted (ferrolb's CRD refuses it).
fn dedup(what: &str, field: &str, list: &[String], c: &mut Conversion) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for item in list {
        if seen.insert(item) {
            out.push(item.clone());
        } else {
            c.notes.push(format!(
                "{what}: {field} names {item:?} twice; it is kept once"
            ));
        }
    }
    out
}

fn convert_advertisement(ad: &Advertisement, c: &mut Conversion) -> Option<L2Advertisement> {
    let mut ok = check_selectors(
        &ad.what,
        "spec.ipAddressPoolSelectors",
        &ad.pool_selectors,
        c,
    );
    ok &= check_selectors(&ad.what, "spec.nodeSelectors", &ad.node_selectors, c);
    if !ok {
        return None;
    }
    let mut converted = L2Advertisement::new(
        &ad.name,
        L2AdvertisementSpec {
            ip_address_pools: dedup(&ad.what, "spec.ipAddressPools", &ad.pools, c),
            ip_address_pool_selectors: ad.pool_selectors.clone(),
            node_selectors: ad.node_selectors.clone(),
            interfaces: dedup(&ad.what, "spec.interfaces", &ad.interfaces, c),
            ..Default::default()
        },
    );
    converted.metadata = object_meta(&ad.name, &Labels::new());
    Some(converted)
}

fn object_meta(name: &str, labels: &Labels) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        labels: (!labels.is_empty()).then(|| labels.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(yaml: &str) -> Vec<Document> {
        ferrolb_api::manifests::documents("test.yaml", yaml)
            .expect("YAML")
            .into_iter()
            .enumerate()
            .map(|(i, value)| Document {
                origin: format!("test.yaml, document {}", i + 1),
                value,
            })
            .collect()
    }

    fn yaml(c: &Conversion) -> String {
        let mut out = String::new();
        for p in &c.pools {
            out.push_str("---\n");
            out.push_str(&serde_saphyr::to_string(p).unwrap());
        }
        for a in &c.advertisements {
            out.push_str("---\n");
            out.push_str(&serde_saphyr::to_string(a).unwrap());
        }
        out
    }

    /// Every field of MetalLB's IPAddressPool and L2Advertisement that ferrolb has.
    const CRDS: &str = r#"
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: production, namespace: metallb-system, labels: {zone: east}}
spec:
  addresses: [192.168.10.0/24, 192.168.9.1-192.168.9.5, "fc00:f853:0ccd:e799::/124"]
  autoAssign: false
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 50
    namespaces: [shop, shop, web]
    namespaceSelectors: [{matchLabels: {team: a}}]
    serviceSelectors: [{matchExpressions: [{key: tier, operator: In, values: [edge]}]}]
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: spare, namespace: metallb-system}
spec:
  addresses: [10.0.0.0/28]
  serviceAllocation: {priority: 0}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: east, namespace: metallb-system}
spec:
  ipAddressPoolSelectors: [{matchLabels: {zone: east}}]
  nodeSelectors: [{matchLabels: {kubernetes.io/hostname: node-a}}]
  interfaces: [eth0, eth1]
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: spare, namespace: metallb-system}
spec: {ipAddressPools: [spare]}
"#;

    #[test]
    fn every_field_ferrolb_has_is_carried_over() {
        let c = convert(&docs(CRDS));
        assert_eq!(c.errors, Vec::<String>::new());
        assert_eq!(c.not_carried, vec![]);
        assert_eq!(c.read, 4);
        let out = yaml(&c);
        let expected = r#"---
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata:
  labels:
    zone: east
  name: production
spec:
  addresses:
  - 192.168.10.0/24
  - 192.168.9.1-192.168.9.5
  - fc00:f853:0ccd:e799::/124
  autoAssign: false
  avoidBuggyIPs: true
  serviceAllocation:
    priority: 50
    namespaces:
    - shop
    - web
    namespaceSelectors:
    - matchLabels:
        team: a
    serviceSelectors:
    - matchExpressions:
      - key: tier
        operator: In
        values:
        - edge
---
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata:
  name: spare
spec:
  addresses:
  - 10.0.0.0/28
  serviceAllocation: {}
---
apiVersion: ferrolb.io/v1beta1
kind: L2Advertisement
metadata:
  name: east
spec:
  ipAddressPoolSelectors:
  - matchLabels:
      zone: east
  nodeSelectors:
  - matchLabels:
      kubernetes.io/hostname: node-a
  interfaces:
  - eth0
  - eth1
  forwarding: none
---
apiVersion: ferrolb.io/v1beta1
kind: L2Advertisement
metadata:
  name: spare
spec:
  ipAddressPools:
  - spare
  forwarding: none
"#;
        assert_eq!(out, expected, "{out}");
        assert!(
            c.notes.iter().any(|n| n.contains("names \"shop\" twice")),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn bgp_and_unknown_parts_are_listed_with_the_reason() {
        let c = convert(&docs(
            r#"
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: routed, namespace: metallb-system}
spec: {addresses: [198.51.100.0/24]}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: both, namespace: metallb-system}
spec: {addresses: [192.0.2.0/28]}
---
apiVersion: metallb.io/v1beta1
kind: BGPAdvertisement
metadata: {name: all, namespace: metallb-system}
spec: {aggregationLength: 32}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: l2, namespace: metallb-system}
spec:
  ipAddressPools: [both]
  serviceSelectors: [{matchLabels: {app: web}}]
  preferredNodeSelectors: [{weight: 1, preference: {matchLabels: {a: b}}}]
---
apiVersion: metallb.io/v1beta2
kind: BGPPeer
metadata: {name: tor, namespace: metallb-system}
spec: {myASN: 64500, peerASN: 64501, peerAddress: 10.0.0.1}
---
apiVersion: metallb.io/v1beta1
kind: BFDProfile
metadata: {name: fast, namespace: metallb-system}
---
apiVersion: metallb.io/v1beta1
kind: Community
metadata: {name: c, namespace: metallb-system}
---
apiVersion: metallb.io/v1beta1
kind: ServiceL2Status
metadata: {name: s, namespace: metallb-system}
"#,
        ));
        assert_eq!(c.errors, Vec::<String>::new());
        let found: Vec<&str> = c.not_carried.iter().map(|f| f.what.as_str()).collect();
        assert_eq!(
            found,
            [
                "BGPAdvertisement \"metallb-system/all\"",
                "L2Advertisement \"metallb-system/l2\" spec.serviceSelectors",
                "L2Advertisement \"metallb-system/l2\" spec.preferredNodeSelectors",
                "BGPPeer \"metallb-system/tor\"",
                "BFDProfile \"metallb-system/fast\"",
                "Community \"metallb-system/c\"",
                "IPAddressPool \"metallb-system/routed\"",
            ]
        );
        assert!(
            c.not_carried[6].why.contains("BGP only"),
            "{:?}",
            c.not_carried[6]
        );
        // Announced by both: carried over.
        let names: Vec<_> = c
            .pools
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["both"]);
        assert_eq!(c.bgp_only_pools.keys().collect::<Vec<_>>(), ["routed"]);
        assert_eq!(
            c.read, 7,
            "ServiceL2Status is MetalLB's status, not configuration"
        );
    }

    #[test]
    fn the_legacy_configmap_the_chart_values_and_the_bare_file_convert_alike() {
        let config = r#"
peers:
- {peer-address: 10.0.0.1, peer-asn: 64501, my-asn: 64500}
bgp-communities: {no-advertise: "65535:65282"}
address-pools:
- name: Capitalized_Pool
  protocol: layer2
  addresses: [192.168.1.240/28]
  auto-assign: false
  avoid-buggy-ips: true
- name: routed
  protocol: bgp
  addresses: [198.51.100.0/24]
  bgp-advertisements: [{aggregation-length: 32}]
"#;
        let indented: String = config.lines().map(|l| format!("    {l}\n")).collect();
        let configmap = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: config, namespace: metallb-system}}\ndata:\n  config: |\n{indented}"
        );
        let values = format!(
            "controller: {{image: {{tag: v0.12.1}}}}\nconfigInline:\n{}",
            config
                .lines()
                .map(|l| format!("  {l}\n"))
                .collect::<String>()
        );
        let outputs: Vec<(String, Vec<String>)> = [configmap, values, config.to_string()]
            .iter()
            .map(|text| {
                let c = convert(&docs(text));
                assert_eq!(c.errors, Vec::<String>::new(), "{text}");
                (
                    yaml(&c),
                    c.not_carried
                        .iter()
                        .map(|f| f.what.rsplit(": ").next().unwrap().to_string())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(outputs[0], outputs[1]);
        assert_eq!(outputs[1], outputs[2]);
        assert_eq!(
            outputs[0].0,
            r#"---
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata:
  name: capitalized-pool
spec:
  addresses:
  - 192.168.1.240/28
  autoAssign: false
  avoidBuggyIPs: true
---
apiVersion: ferrolb.io/v1beta1
kind: L2Advertisement
metadata:
  name: capitalized-pool
spec:
  ipAddressPools:
  - capitalized-pool
  forwarding: none
"#
        );
        assert_eq!(
            outputs[0].1,
            [
                "peers[0]",
                "bgp-communities.no-advertise",
                "address-pools[1] (\"routed\")",
            ]
        );
        let c = convert(&docs(config));
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains("renamed \"capitalized-pool\"")),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn bad_input_names_the_object_and_field_and_converts_the_rest() {
        let c = convert(&docs(
            r#"
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: typo, namespace: metallb-system}
spec: {addresses: [192.168.10.5/24, 10.0.0.1]}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: good, namespace: metallb-system}
spec: {addresses: [10.1.0.0/30]}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: good, namespace: other}
spec: {addresses: [10.2.0.0/30]}
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata: {name: l2, namespace: metallb-system}
spec: {nodeSelectors: [{matchExpressions: [{key: a, operator: Near}]}]}
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {name: wrong, namespace: metallb-system}
spec: {addresses: 10.3.0.0/30}
"#,
        ));
        assert_eq!(c.errors.len(), 4, "{:#?}", c.errors);
        assert!(
            c.errors[0].contains("IPAddressPool \"metallb-system/wrong\": spec:"),
            "{}",
            c.errors[0]
        );
        assert!(
            c.errors[1].contains(
                "\"other/good\" and IPAddressPool \"metallb-system/good\" are both named \"good\""
            ),
            "{}",
            c.errors[1]
        );
        assert!(
            c.errors[2].starts_with("IPAddressPool \"metallb-system/typo\": spec.addresses[0]:"),
            "{}",
            c.errors[2]
        );
        assert!(
            c.errors[3].starts_with("L2Advertisement \"metallb-system/l2\": spec.nodeSelectors[0].matchExpressions[0]: unknown operator"),
            "{}",
            c.errors[3]
        );
        let names: Vec<_> = c
            .pools
            .iter()
            .map(|p| p.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["good", "good"]);
    }

    #[test]
    fn legacy_names_become_kubernetes_names() {
        assert_eq!(
            kubernetes_name("01-numbered-addresspool"),
            "01-numbered-addresspool"
        );
        assert_eq!(
            kubernetes_name("Capitalized-AddressPool"),
            "capitalized-addresspool"
        );
        assert_eq!(kubernetes_name("_under_score_"), "under-score");
        assert_eq!(kubernetes_name(&"x".repeat(80)).len(), 63);
    }
}
