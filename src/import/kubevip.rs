//! kube-vip's cloud provider configuration turned into ferrolb's (pure): the ConfigMap
//! (`kubevip` in `kube-system`) whose keys `cidr-NAMESPACE` / `range-NAMESPACE` give a
//! namespace its addresses and `cidr-global` / `range-global` everyone else's. Each
//! becomes an IPAddressPool; one L2Advertisement announces them all, as kube-vip's
//! speakers announce every Service.

use std::collections::BTreeMap;

use ferrolb_api::{
    AddressEntry, IPAddressPool, IPAddressPoolSpec, L2Advertisement, L2AdvertisementSpec,
    ServiceAllocation,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use super::conversion::{Conversion, Document, Finding, cidr_without_ends};

/// Where kube-vip's cloud provider reads its configuration.
pub const CONFIG_MAP: &str = "kubevip";
pub const NAMESPACE: &str = "kube-system";

/// Converts the `kubevip` ConfigMap among `docs` (any namespace, when read from files).
pub fn convert(docs: &[Document]) -> Conversion {
    let mut c = Conversion::default();
    for doc in docs {
        let v = &doc.value;
        if v.get("kind").and_then(Value::as_str) != Some("ConfigMap")
            || v.pointer("/metadata/name").and_then(Value::as_str) != Some(CONFIG_MAP)
        {
            continue;
        }
        c.read += 1;
        let data: BTreeMap<String, String> = v
            .get("data")
            .and_then(|d| serde_json::from_value(d.clone()).ok())
            .unwrap_or_default();
        convert_data(
            &format!("{}: ConfigMap \"{CONFIG_MAP}\"", doc.origin),
            &data,
            &mut c,
        );
    }
    c
}

fn convert_data(what: &str, data: &BTreeMap<String, String>, c: &mut Conversion) {
    let skip_ends = data.get("skip-end-ips-in-cidr").map(String::as_str) == Some("true");
    // kube-vip takes a namespace's CIDRs, else the global CIDRs, else the namespace's
    // ranges, else the global ranges.
    let mut namespaces: Vec<&str> = data
        .keys()
        .filter_map(|k| k.strip_prefix("cidr-").or_else(|| k.strip_prefix("range-")))
        .filter(|ns| *ns != "global")
        .collect();
    namespaces.sort();
    namespaces.dedup();
    let global = data
        .get("cidr-global")
        .map(|v| ("cidr-global", v))
        .or_else(|| data.get("range-global").map(|v| ("range-global", v)));
    for ns in &namespaces {
        let own = data
            .get(&format!("cidr-{ns}"))
            .map(|v| (format!("cidr-{ns}"), v));
        let chosen = match (own, data.get(&format!("range-{ns}"))) {
            (Some(own), _) => Some(own),
            (None, Some(range)) if !data.contains_key("cidr-global") => {
                Some((format!("range-{ns}"), range))
            }
            (None, Some(_)) => {
                c.notes.push(format!(
                    "{what}: range-{ns} is never used by kube-vip, which takes cidr-global \
                     first; it is not imported"
                ));
                None
            }
            (None, None) => None,
        };
        if let Some((key, value)) = chosen
            && let Some(pool) = pool(
                what,
                &format!("kube-vip-{ns}"),
                &key,
                value,
                skip_ends,
                Some(ns),
                c,
            )
        {
            c.pools.push(pool);
        }
    }
    if let Some((key, value)) = global
        && let Some(pool) = pool(what, "kube-vip-global", key, value, skip_ends, None, c)
    {
        c.pools.push(pool);
        if !namespaces.is_empty() {
            c.notes.push(format!(
                "{what}: a namespace with addresses of its own takes them first in ferrolb \
                 too, but falls back on kube-vip-global when they run out (kube-vip does not)"
            ));
        }
    }
    for (key, value) in data {
        let known =
            key.starts_with("cidr-") || key.starts_with("range-") || key == "skip-end-ips-in-cidr";
        if known {
            continue;
        }
        let why = if key.starts_with("allow-share-") {
            "kube-vip lets any two Services of the namespace share an IP when their ports \
             differ; ferrolb shares an IP between Services that carry the same \
             ferrolb.io/allow-shared-ip key"
        } else if key == "search-order" && value == "desc" {
            "ferrolb gives a new Service the lowest free address, not the highest (IPs \
             already given keep)"
        } else if key.starts_with("interface-") {
            "the interface kube-vip binds for a namespace's Services: list it in the \
             L2Advertisement's interfaces if it is not the one the node's subnet is on"
        } else {
            "not a key of kube-vip's cloud provider that ferrolb knows"
        };
        c.not_carried.push(Finding {
            what: format!("{what} data.{key}"),
            why: why.into(),
        });
    }
    if !c.pools.is_empty() {
        let mut ad = L2Advertisement::new("kube-vip", L2AdvertisementSpec::default());
        ad.metadata = ObjectMeta {
            name: Some("kube-vip".into()),
            ..Default::default()
        };
        c.advertisements.push(ad);
    }
    c.sort();
}

fn pool(
    what: &str,
    name: &str,
    key: &str,
    value: &str,
    skip_ends: bool,
    namespace: Option<&str>,
    c: &mut Conversion,
) -> Option<IPAddressPool> {
    let mut addresses = Vec::new();
    let mut ok = true;
    for (i, item) in value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        let entry = if key.starts_with("cidr-") && skip_ends {
            match cidr_without_ends(item) {
                Ok(e) => e,
                Err(e) => {
                    c.errors
                        .push(format!("{what} data.{key}, item {}: {e}", i + 1));
                    ok = false;
                    continue;
                }
            }
        } else {
            item.to_string()
        };
        if let Err(e) = ferrolb_api::address::parse_range(&entry) {
            c.errors
                .push(format!("{what} data.{key}, item {}: {e}", i + 1));
            ok = false;
        }
        addresses.push(AddressEntry(entry));
    }
    if addresses.is_empty() && ok {
        c.errors.push(format!("{what} data.{key} is empty"));
        ok = false;
    }
    if !ok {
        return None;
    }
    let mut pool = IPAddressPool::new(
        name,
        IPAddressPoolSpec {
            addresses,
            service_allocation: namespace.map(|ns| ServiceAllocation {
                namespaces: vec![ns.to_string()],
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    pool.metadata = ObjectMeta {
        name: Some(name.to_string()),
        ..Default::default()
    };
    Some(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configmap(data: &str) -> Vec<Document> {
        let yaml = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: kubevip, namespace: kube-system}}\ndata: {data}\n"
        );
        ferrolb_api::manifests::documents("kubevip.yaml", &yaml)
            .unwrap()
            .into_iter()
            .map(|value| Document {
                origin: "kubevip.yaml".into(),
                value,
            })
            .collect()
    }

    fn entries(c: &Conversion, name: &str) -> Vec<String> {
        let pool = c
            .pools
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no pool {name}: {c:?}"));
        pool.spec.addresses.iter().map(|a| a.0.clone()).collect()
    }

    #[test]
    fn namespaces_and_the_global_pool_convert_as_kube_vip_reads_them() {
        let c = convert(&configmap(
            "{cidr-global: '192.168.0.216/29', range-shop: '10.0.0.10-10.0.0.20,10.0.0.30-10.0.0.31', \
             cidr-web: '10.1.0.0/24, 10.2.0.0/24', skip-end-ips-in-cidr: 'true', allow-share-web: 'true', \
             search-order: desc}",
        ));
        assert_eq!(c.errors, Vec::<String>::new());
        assert_eq!(
            entries(&c, "kube-vip-global"),
            ["192.168.0.217-192.168.0.222"]
        );
        assert_eq!(
            entries(&c, "kube-vip-web"),
            ["10.1.0.1-10.1.0.254", "10.2.0.1-10.2.0.254"]
        );
        assert!(
            c.pools
                .iter()
                .all(|p| p.metadata.name.as_deref() != Some("kube-vip-shop")),
            "cidr-global wins over range-shop in kube-vip"
        );
        assert!(
            c.notes
                .iter()
                .any(|n| n.contains("range-shop is never used")),
            "{:?}",
            c.notes
        );
        let web = c
            .pools
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some("kube-vip-web"))
            .unwrap();
        assert_eq!(
            web.spec.service_allocation.as_ref().unwrap().namespaces,
            ["web"]
        );
        let found: Vec<&str> = c.not_carried.iter().map(|f| f.what.as_str()).collect();
        assert_eq!(
            found,
            [
                "kubevip.yaml: ConfigMap \"kubevip\" data.allow-share-web",
                "kubevip.yaml: ConfigMap \"kubevip\" data.search-order",
            ]
        );
        assert_eq!(c.advertisements.len(), 1);
    }

    #[test]
    fn ranges_serve_when_there_is_no_global_cidr_and_bad_entries_are_named() {
        let c = convert(&configmap(
            "{range-global: '192.168.0.200-192.168.0.202', range-shop: '10.0.0.10-10.0.0.20'}",
        ));
        assert_eq!(entries(&c, "kube-vip-shop"), ["10.0.0.10-10.0.0.20"]);
        assert_eq!(
            entries(&c, "kube-vip-global"),
            ["192.168.0.200-192.168.0.202"]
        );
        let c = convert(&configmap("{cidr-global: '192.168.0.0/24,banana'}"));
        assert!(
            c.errors[0]
                .starts_with("kubevip.yaml: ConfigMap \"kubevip\" data.cidr-global, item 2:"),
            "{:?}",
            c.errors
        );
        assert!(c.pools.is_empty());
    }
}
