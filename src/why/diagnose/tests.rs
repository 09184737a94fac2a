//! One test per diagnosis, from manifests: each breaks one link of a healthy Service
//! and checks that `why` names that link.

use super::*;

const NODES: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 10.0.0.1}], conditions: [{type: Ready, status: 'True'}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 10.0.0.2}], conditions: [{type: Ready, status: 'True'}]}
";
const POOL: &str = "
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab}
spec: {addresses: [192.0.2.10-192.0.2.20]}
";
const ADVERTISEMENT: &str = "
apiVersion: ferrolb.io/v1beta1
kind: L2Advertisement
metadata: {name: lab}
spec: {}
";
const IP: &str = "192.0.2.10";

fn service(extra_spec: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: shop}}\n\
         spec: {{type: LoadBalancer, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080, nodePort: 30080}}]{extra_spec}}}\n\
         status: {status}\n"
    )
}

/// The Service's status once the controller assigned the IP and `node` reported it.
fn announced_by(node: &str) -> String {
    format!(
        "{{loadBalancer: {{ingress: [{{ip: {IP}}}]}}, conditions: [{{type: ferrolb.io/AnnouncedIPv4, status: 'True', \
         reason: NodeAssigned, message: '{IP} is announced by {node} on eth0', lastTransitionTime: '2026-01-01T00:00:00Z'}}]}}"
    )
}

fn slice(node: &str, ready: bool) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: web-x, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}\n\
         addressType: IPv4\n\
         endpoints: [{{addresses: [10.244.0.5], conditions: {{ready: {ready}}}, nodeName: {node}, targetRef: {{kind: Pod, name: web-0, namespace: shop}}}}]\n\
         ports: [{{port: 8080}}]\n"
    )
}

fn pod(node: &str, ready: bool, port: u16) -> String {
    let status = if ready { "'True'" } else { "'False'" };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-0, namespace: shop, labels: {{app: web}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: web, image: web, ports: [{{containerPort: {port}}}]}}]}}\n\
         status: {{conditions: [{{type: Ready, status: {status}}}]}}\n"
    )
}

fn facts(documents: &[&str], components: Option<Components>) -> Facts {
    let mut manifests = Manifests::default();
    let errors = manifests.add_text("test.yaml", &documents.join("\n---\n"));
    assert!(errors.is_empty(), "{errors:?}");
    Facts {
        manifests,
        ferrolb_namespace: "ferrolb-system".into(),
        class: ferrolb_api::annotations::LOAD_BALANCER_CLASS.into(),
        components,
    }
}

/// Both speakers ready, the controller active.
fn running() -> Components {
    Components {
        controller: Ok("ferrolb-controller-0".into()),
        speakers: ["node-a", "node-b"]
            .into_iter()
            .map(|n| {
                (
                    n.to_string(),
                    Speaker {
                        pod: format!("speaker-{n}"),
                        ready: true,
                        problem: None,
                        kube_proxy_failing: None,
                        kernel_answers_arp: None,
                    },
                )
            })
            .collect(),
    }
}

fn why(documents: &[&str], components: Option<Components>) -> Diagnosis {
    diagnose(
        &facts(documents, components),
        &ServiceKey::new("shop", "web"),
    )
}

/// `why` in a running cluster where node-a announces the Service, with `extra` objects
/// (EndpointSlices, Pods) beside it.
fn announced_with(extra: &[&str]) -> Diagnosis {
    let svc = service("", &announced_by("node-a"));
    let mut docs = vec![NODES, POOL, ADVERTISEMENT, svc.as_str()];
    docs.extend_from_slice(extra);
    why(&docs, Some(running()))
}

/// A healthy cluster's objects with `service` in place of the Service.
fn cluster(service: &str) -> Vec<String> {
    vec![
        NODES.into(),
        POOL.into(),
        ADVERTISEMENT.into(),
        service.into(),
        slice("node-a", true),
        pod("node-a", true, 8080),
    ]
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn healthy_names_the_node_that_reported_and_the_ready_endpoints() {
    let docs = cluster(&service("", &announced_by("node-b")));
    let d = why(&refs(&docs), Some(running()));
    assert!(d.healthy, "{d:?}");
    assert_eq!(
        d.headline,
        format!("shop/web is healthy: {IP} announced by node-b")
    );
    assert_eq!(d.node.as_deref(), Some("node-b"));
    assert!(
        d.evidence.contains(&"ready endpoints: web-0".to_string()),
        "{d:?}"
    );
}

/// Issue 23, item 2: a node passed over for its kube-proxy is named with the reason its
/// record gives; when every node fails, `why` says the check is ignored.
#[test]
fn a_node_whose_kube_proxy_fails_is_named_as_passed_over() {
    let docs = cluster(&service("", &announced_by("node-b")));
    let refused = "http://10.0.0.1:10256/healthz: Connection refused (os error 111)";
    let mut components = running();
    components
        .speakers
        .get_mut("node-a")
        .unwrap()
        .kube_proxy_failing = Some(refused.into());
    let d = why(&refs(&docs), Some(components.clone()));
    assert!(d.healthy, "{d:?}");
    assert!(
        d.evidence.contains(&format!(
            "passed over while another node can deliver: node-a (kube-proxy fails its health check: {refused})"
        )),
        "{d:?}"
    );
    components
        .speakers
        .get_mut("node-b")
        .unwrap()
        .kube_proxy_failing = Some(refused.into());
    let d = why(&refs(&docs), Some(components));
    assert!(
        d.evidence.iter().any(|e| e.starts_with(
            "kube-proxy fails on every node that may announce it, so the check is ignored and traffic may go nowhere: node-a"
        )),
        "{d:?}"
    );
}

/// Issue 23, item 3: two hosts answer, and a node's record says its own kernel answers
/// for VIPs (IPVS without strictARP): `why` names the cause and the fix.
#[test]
fn a_kernel_answering_for_vips_is_named_as_the_other_host() {
    let status = format!(
        "{{loadBalancer: {{ingress: [{{ip: {IP}}}]}}, conditions: [{{type: ferrolb.io/AnnouncedIPv4, status: 'True', \
         reason: ConflictingResponder, message: '{IP} is announced by node-a on eth0, and another host answers for it too, MAC 02:00:00:00:00:0b (node node-b)', \
         lastTransitionTime: '2026-01-01T00:00:00Z'}}]}}"
    );
    let docs = cluster(&service("", &status));
    let mut components = running();
    // node-a's kernel answers for VIPs too, but the condition names node-b.
    for node in ["node-a", "node-b"] {
        components
            .speakers
            .get_mut(node)
            .unwrap()
            .kernel_answers_arp =
            Some("this node's kernel answers ARP on eth0 for 1 VIP(s) it does not announce".into());
    }
    let d = why(&refs(&docs), Some(components));
    assert!(!d.healthy, "{d:?}");
    assert_eq!(
        d.headline,
        format!(
            "the kernels of node-b answer ARP for {IP} too: kube-proxy in IPVS mode without strictARP"
        )
    );
    assert!(
        d.next
            .as_deref()
            .is_some_and(|n| n.starts_with("set ipvs.strictARP: true")),
        "{d:?}"
    );
}

#[test]
fn a_ready_endpoint_without_pod_objects_is_healthy() {
    // EndpointSlices are what kube-proxy uses; Pods are not needed to trust them.
    let d = announced_with(&[&slice("node-a", true)]);
    assert!(d.healthy, "{d:?}");
}

#[test]
fn from_files_the_election_names_the_node() {
    let docs = [
        NODES,
        POOL,
        ADVERTISEMENT,
        &service("", "{}"),
        &slice("node-a", true),
    ];
    let d = why(&docs, None);
    assert!(d.healthy, "{d:?}");
    let owner = election::owner(IP.parse().unwrap(), ["node-a", "node-b"]).unwrap();
    assert_eq!(
        d.headline,
        format!("shop/web is healthy: {IP} announced by {owner}")
    );
}

/// An L2Advertisement's `nodePriorities` decide, as on the speakers: whichever node the
/// hash prefers, the preferred one is named.
#[test]
fn from_files_the_election_follows_node_priorities() {
    let hashed = election::owner(IP.parse().unwrap(), ["node-a", "node-b"]).unwrap();
    let other = if hashed == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    let advertisement = format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: lab}}\n\
         spec: {{nodePriorities: [{{nodeSelector: {{matchLabels: {{kubernetes.io/hostname: {other}}}}}, priority: 10}}]}}\n"
    );
    let nodes = NODES.replace(
        &format!("metadata: {{name: {other}}}"),
        &format!("metadata: {{name: {other}, labels: {{kubernetes.io/hostname: {other}}}}}"),
    );
    let docs = [
        nodes.as_str(),
        POOL,
        &advertisement,
        &service("", "{}"),
        &slice("node-a", true),
    ];
    let d = why(&docs, None);
    assert!(d.healthy, "{d:?}");
    assert_eq!(
        d.headline,
        format!("shop/web is healthy: {IP} announced by {other}")
    );
}

#[test]
fn from_files_ready_pods_stand_for_the_endpoints_a_cluster_would_make() {
    let docs = [
        NODES,
        POOL,
        ADVERTISEMENT,
        &service("", "{}"),
        &pod("node-a", true, 8080),
    ];
    assert!(why(&docs, None).healthy);
    // But not once the files hold the Service's EndpointSlice, nor in a cluster.
    let docs = [
        NODES,
        POOL,
        ADVERTISEMENT,
        &service("", "{}"),
        &pod("node-a", true, 8080),
        &slice("node-a", false),
    ];
    assert!(!why(&docs, None).healthy);
}

#[test]
fn no_such_service() {
    let d = why(&[NODES, POOL], None);
    assert_eq!(d.headline, "there is no Service shop/web");
}

#[test]
fn not_a_load_balancer() {
    let svc = service("", "{}").replace("type: LoadBalancer", "type: ClusterIP");
    let d = why(&[&svc], None);
    assert!(
        d.headline
            .contains("is of type ClusterIP, not LoadBalancer"),
        "{}",
        d.headline
    );
}

#[test]
fn another_class() {
    let docs = [service(", loadBalancerClass: example.com/lb", "{}")];
    let d = why(&refs(&docs), None);
    assert!(
        d.headline.contains("has loadBalancerClass example.com/lb"),
        "{}",
        d.headline
    );
}

#[test]
fn pending_without_a_pool() {
    let docs = [NODES, &service("", "{}")];
    let d = why(&docs, None);
    assert!(
        d.headline.starts_with("shop/web is pending: "),
        "{}",
        d.headline
    );
    assert_eq!(
        d.next.as_deref(),
        Some("create an IPAddressPool (docs/api.md)")
    );
}

#[test]
fn pending_with_no_active_controller() {
    let mut components = running();
    components.controller =
        Err("its Lease ferrolb-system/ferrolb-controller was last renewed 73 s ago by x".into());
    let docs = cluster(&service("", "{}"));
    let d = why(&refs(&docs), Some(components));
    assert_eq!(
        d.headline,
        "shop/web is pending because no ferrolb controller is active: its Lease ferrolb-system/ferrolb-controller was last renewed 73 s ago by x"
    );
}

#[test]
fn pending_though_a_pool_has_an_ip() {
    let docs = cluster(&service("", "{}"));
    let d = why(&refs(&docs), Some(running()));
    assert_eq!(
        d.headline,
        format!(
            "shop/web is pending, though a pool has {IP} for it: the active controller (ferrolb-controller-0) has not assigned it yet"
        )
    );
}

#[test]
fn an_ip_in_no_pool() {
    let docs = [NODES, ADVERTISEMENT, &service("", &announced_by("node-a"))];
    let d = why(&docs, Some(running()));
    assert!(
        d.headline
            .starts_with(&format!("{IP} is assigned but is in no IPAddressPool")),
        "{}",
        d.headline
    );
}

#[test]
fn no_advertisement() {
    let docs = [NODES, POOL, &service("", &announced_by("node-a"))];
    let d = why(&docs, Some(running()));
    assert_eq!(
        d.headline,
        format!(
            "{IP} is assigned but nobody answers for it: no L2Advertisement announces pool lab"
        )
    );
}

#[test]
fn no_eligible_node_names_each_nodes_reason_as_the_speakers_judge_it() {
    let nodes = NODES
        .replace("metadata: {name: node-a}", "metadata: {name: node-a, labels: {node.kubernetes.io/exclude-from-external-load-balancers: ''}}")
        .replacen("status: 'True'", "status: 'False'", 2);
    let docs = [
        &nodes,
        POOL,
        ADVERTISEMENT,
        &service("", &announced_by("node-a")),
    ];
    let d = why(&docs, Some(running()));
    assert_eq!(
        d.headline,
        format!(
            "{IP} is assigned but no node may announce it: node-a: {}; node-b: {}",
            Ineligible::Excluded,
            Ineligible::NotReady
        )
    );
}

#[test]
fn local_traffic_without_a_local_endpoint_makes_no_node_eligible() {
    let docs = [
        NODES,
        POOL,
        ADVERTISEMENT,
        &service(", externalTrafficPolicy: Local", &announced_by("node-a")),
        &slice("node-a", false),
    ];
    let d = why(&docs, Some(running()));
    assert!(
        d.headline.ends_with(&format!(
            "node-a: {0}; node-b: {0}",
            Ineligible::NoLocalEndpoint
        )),
        "{}",
        d.headline
    );
}

#[test]
fn no_ready_speaker() {
    let mut components = running();
    for s in components.speakers.values_mut() {
        s.ready = false;
        s.problem = Some("in CrashLoopBackOff".into());
    }
    let docs = cluster(&service("", &announced_by("node-a")));
    let d = why(&refs(&docs), Some(components));
    assert!(
        d.headline
            .starts_with(&format!("{IP} is assigned but no ready speaker runs")),
        "{}",
        d.headline
    );
    assert!(d.next.unwrap().contains("logs speaker-node-a --previous"));
}

#[test]
fn no_report_yet() {
    let status = format!("{{loadBalancer: {{ingress: [{{ip: {IP}}}]}}}}");
    let docs = cluster(&service("", &status));
    let d = why(&refs(&docs), Some(running()));
    assert_eq!(
        d.headline,
        format!(
            "{IP} is assigned and may be announced by node-a, node-b, but no speaker has reported announcing it"
        )
    );
}

#[test]
fn a_report_by_a_node_that_may_no_longer_announce() {
    let nodes = NODES.replacen("status: 'True'", "status: 'False'", 1);
    let docs = [
        &nodes,
        POOL,
        ADVERTISEMENT,
        &service("", &announced_by("node-a")),
        &slice("node-b", true),
    ];
    let d = why(&docs, Some(running()));
    assert_eq!(
        d.headline,
        format!(
            "{IP} is reported announced ({IP} is announced by node-a on eth0), but by none of the nodes that may announce it now (node-b)"
        )
    );
}

#[test]
fn the_selector_matches_no_pod() {
    let d = announced_with(&[]);
    assert_eq!(
        d.headline,
        format!(
            "{IP} is announced by node-a, but the selector app=web matches no Pod in namespace shop"
        )
    );
}

#[test]
fn no_pod_is_ready() {
    let d = announced_with(&[&slice("node-a", false), &pod("node-a", false, 8080)]);
    assert_eq!(
        d.headline,
        format!("{IP} is announced by node-a, but none of the 1 Pods matching app=web is Ready")
    );
}

#[test]
fn ready_pods_without_endpoints() {
    let d = announced_with(&[&pod("node-a", true, 8080)]);
    assert_eq!(
        d.headline,
        format!(
            "{IP} is announced by node-a, but no EndpointSlice lists a ready endpoint, though 1 of the 1 Pods matching app=web are Ready"
        )
    );
}

#[test]
fn local_traffic_reported_by_a_node_whose_endpoint_moved_away() {
    // Reported by node-b, which held the endpoint before it moved to node-a: node-b may
    // no longer announce (the speakers' rule), so its report is stale.
    let local = service(", externalTrafficPolicy: Local", &announced_by("node-b"));
    let docs = [NODES, POOL, ADVERTISEMENT, &local, &slice("node-a", true)];
    let d = why(&docs, Some(running()));
    assert!(
        d.headline
            .starts_with(&format!("{IP} is reported announced")),
        "{}",
        d.headline
    );
}

#[test]
fn a_target_port_the_pods_do_not_expose() {
    let d = announced_with(&[&slice("node-a", true), &pod("node-a", true, 9090)]);
    assert_eq!(
        d.headline,
        format!(
            "{IP} is announced by node-a, but targetPort 8080 of port 80 is not a port the Pods expose (9090)"
        )
    );
}

#[test]
fn forwarding_without_a_node_port() {
    let advertisement = ADVERTISEMENT.replace("spec: {}", "spec: {forwarding: nodePort}");
    let svc = service("", &announced_by("node-a")).replace(", nodePort: 30080", "");
    let docs = [NODES, POOL, &advertisement, &svc, &slice("node-a", true)];
    let d = why(&docs, Some(running()));
    assert_eq!(
        d.headline,
        format!(
            "{IP} is announced by node-a, but forwarding: nodePort has no NodePort to send port 80 to"
        )
    );
}

#[test]
fn ferrolb_not_running() {
    let components = Components {
        controller: Err(
            "there is no Lease ferrolb-system/ferrolb-controller: no controller has run there"
                .into(),
        ),
        speakers: BTreeMap::new(),
    };
    let docs = cluster(&service("", &announced_by("node-a")));
    let d = why(&refs(&docs), Some(components));
    assert!(
        d.headline
            .starts_with("ferrolb is not running: no speaker Pod runs in namespace ferrolb-system"),
        "{}",
        d.headline
    );
}

/// Issue 22, item 3: IPs another controller wrote, outside ferrolb's pools, name it.
#[test]
fn ips_another_controller_wrote_name_it() {
    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  managedFields:\n  \
         - manager: metallb-controller\n    operation: Update\n    subresource: status\n    apiVersion: v1\n    \
         fieldsType: FieldsV1\n    fieldsV1: {f:status: {f:loadBalancer: {f:ingress: {}}}}\n\
         spec: {type: LoadBalancer, selector: {app: web}, ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}\n\
         status: {loadBalancer: {ingress: [{ip: 198.51.100.7}]}}\n";
    let d = diagnose(
        &facts(&[NODES, POOL, ADVERTISEMENT, svc], None),
        &ServiceKey::new("shop", "web"),
    );
    assert!(!d.healthy);
    assert_eq!(
        d.headline,
        "shop/web is served by another controller: \"metallb-controller\" wrote 198.51.100.7 to its status, in no IPAddressPool of ferrolb's"
    );
    assert!(d.next.unwrap().contains("spec.loadBalancerClass"));
}
