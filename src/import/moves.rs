//! Whether ferrolb, given the converted pools, would leave every Service the IPs it
//! holds now (pure): the allocator run on the cluster's Services, as `ferrolb plan` runs
//! it, compared with their status.

use std::net::IpAddr;

use ferrolb_allocator::{Outcome, Start, input};
use ferrolb_api::manifests::{Located, Manifests, Origin};

use super::conversion::Conversion;

/// What the converted configuration does to the Services that hold IPs now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Check {
    /// Services that keep exactly their IPs.
    pub kept: usize,
    /// Services that would lose an IP: their name, and why, in a sentence.
    pub moved: Vec<(String, String)>,
    /// Services that keep their IPs in status, but ferrolb would not announce some of
    /// them (outside every pool): their traffic stops as if they moved.
    pub unserved: Vec<(String, String)>,
    /// Services that keep and are announced their IPs, which ferrolb would no longer
    /// give them (a pool closed to them): the reason, as `ferrolb plan` warns.
    pub stranded: Vec<(String, String)>,
    /// Services without an IP now, which ferrolb would serve as a new Service.
    pub pending_now: usize,
}

/// Runs the allocator with `conversion`'s pools over the Services and Namespaces of
/// `cluster` (any pools in it are ignored: the question is what ferrolb's would do).
pub fn check(cluster: &Manifests, conversion: &Conversion) -> Check {
    let mut m = cluster.clone();
    m.pools = conversion
        .pools
        .iter()
        .map(|p| Located::new(Origin::cluster(), p.clone()))
        .collect();
    m.l2_advertisements = conversion
        .advertisements
        .iter()
        .map(|a| Located::new(Origin::cluster(), a.clone()))
        .collect();
    let prepared = input::prepare(&m);
    let plan = prepared.plan(Start::Lowest);
    let mut check = Check::default();
    for located in &m.services {
        let svc = &located.object;
        if !input::is_ours(svc) {
            continue;
        }
        let key = input::service_key(svc);
        let now = input::ingress_ips(svc);
        if now.is_empty() {
            check.pending_now += 1;
            continue;
        }
        let Some(outcome) = plan.services.get(&key) else {
            // Refused before allocation (an invalid request): ferrolb gives it nothing.
            check.moved.push((
                key.to_string(),
                format!(
                    "it holds {} but its spec or annotations are refused by ferrolb",
                    list(&now)
                ),
            ));
            continue;
        };
        let then: Vec<IpAddr> = outcome.assignments().iter().map(|a| a.ip).collect();
        let lost: Vec<IpAddr> = now
            .iter()
            .copied()
            .filter(|ip| !then.contains(ip))
            .collect();
        match outcome {
            Outcome::Pending { reason, .. } => check.moved.push((
                key.to_string(),
                format!("it would lose {}: {reason}", list(&now)),
            )),
            _ if !lost.is_empty() => {
                let why = lost
                    .iter()
                    .map(|ip| where_is(*ip, conversion))
                    .collect::<Vec<_>>()
                    .join("; ");
                check.moved.push((
                    key.to_string(),
                    format!(
                        "it would get {} instead of {}: {why}",
                        list(&then),
                        list(&now)
                    ),
                ));
            }
            Outcome::Stranded { reason, .. } => {
                let outside: Vec<String> = outcome
                    .assignments()
                    .iter()
                    .filter(|a| a.pool.is_empty())
                    .map(|a| where_is(a.ip, conversion))
                    .collect();
                if outside.is_empty() {
                    check.stranded.push((key.to_string(), reason.clone()));
                } else {
                    check.unserved.push((key.to_string(), outside.join("; ")));
                }
            }
            Outcome::Assigned { .. } => check.kept += 1,
        }
    }
    check.moved.sort();
    check.unserved.sort();
    check.stranded.sort();
    check
}

/// Why an IP is not in the converted pools, as far as the conversion knows.
fn where_is(ip: IpAddr, conversion: &Conversion) -> String {
    for (pool, entries) in &conversion.bgp_only_pools {
        if entries
            .iter()
            .filter_map(|e| ferrolb_api::address::parse_range(&e.0).ok())
            .any(|r| r.contains(ip))
        {
            return format!(
                "{ip} is in MetalLB's pool {pool:?}, which MetalLB announces by BGP only and was not imported"
            );
        }
    }
    let in_pool = conversion.pools.iter().find(|p| {
        p.spec
            .addresses
            .iter()
            .filter_map(|e| ferrolb_api::address::parse_range(&e.0).ok())
            .any(|r| r.contains(ip))
    });
    match in_pool {
        Some(p) => format!(
            "{ip} is in pool {:?}, which does not serve this Service (namespaces, selectors, or its annotations ask for another pool)",
            p.metadata.name.as_deref().unwrap_or_default()
        ),
        None => format!("{ip} is in no imported pool"),
    }
}

fn list(ips: &[IpAddr]) -> String {
    if ips.is_empty() {
        return "no IP".into();
    }
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::metallb::{Document, convert};

    fn conversion(yaml: &str) -> Conversion {
        let docs: Vec<Document> = ferrolb_api::manifests::documents("metallb.yaml", yaml)
            .unwrap()
            .into_iter()
            .map(|value| Document {
                origin: "metallb.yaml".into(),
                value,
            })
            .collect();
        convert(&docs)
    }

    fn services(yaml: &str) -> Manifests {
        let mut m = Manifests::default();
        assert_eq!(m.add_text("services.yaml", yaml), vec![]);
        m
    }

    fn service(name: &str, ip: &str, annotations: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop, annotations: {{{annotations}}}}}\n\
             spec: {{type: LoadBalancer, ports: [{{port: 80}}]}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}\n"
        )
    }

    const LEGACY: &str = r#"
address-pools:
- {name: Office_LAN, protocol: layer2, addresses: [192.168.1.240/28]}
- {name: routed, protocol: bgp, addresses: [198.51.100.0/24]}
- {name: lab, protocol: layer2, addresses: [10.0.0.0/29], auto-assign: false}
"#;

    #[test]
    fn services_keep_their_ips_or_are_named_with_the_reason() {
        let c = conversion(LEGACY);
        let m = services(&format!(
            "{}{}{}{}{}",
            service("web", "192.168.1.241", ""),
            service("lab", "10.0.0.3", "metallb.universe.tf/address-pool: lab"),
            service("routed", "198.51.100.7", ""),
            service(
                "asks",
                "192.168.1.242",
                "metallb.universe.tf/address-pool: Office_LAN"
            ),
            service("gone", "172.16.0.1", ""),
        ));
        let check = check(&m, &c);
        assert_eq!(check.kept, 2, "{check:#?}");
        let moved: Vec<&str> = check.moved.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(moved, ["shop/asks"], "{check:#?}");
        assert!(
            check.moved[0].1.contains("Office_LAN"),
            "{}",
            check.moved[0].1
        );
        let unserved: Vec<(&str, &str)> = check
            .unserved
            .iter()
            .map(|(s, w)| (s.as_str(), w.as_str()))
            .collect();
        assert_eq!(unserved.len(), 2, "{check:#?}");
        assert_eq!(unserved[0].0, "shop/gone");
        assert!(
            unserved[0].1.contains("172.16.0.1 is in no imported pool"),
            "{}",
            unserved[0].1
        );
        assert_eq!(unserved[1].0, "shop/routed");
        assert!(
            unserved[1].1.contains(
                "198.51.100.7 is in MetalLB's pool \"routed\", which MetalLB announces by BGP only"
            ),
            "{}",
            unserved[1].1
        );
    }

    #[test]
    fn a_pool_closed_to_the_namespace_strands_its_services() {
        let c = conversion(
            "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: p, namespace: metallb-system}\n\
             spec: {addresses: [192.0.2.0/28], serviceAllocation: {namespaces: [other]}}\n",
        );
        let m = services(&service("web", "192.0.2.3", ""));
        let check = check(&m, &c);
        assert_eq!(check.kept, 0, "{check:#?}");
        assert_eq!(check.moved, vec![], "{check:#?}");
        assert_eq!(check.stranded.len(), 1, "{check:#?}");
        assert!(check.stranded[0].1.contains("192.0.2.3"), "{check:#?}");
    }
}
