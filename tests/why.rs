//! `ferrolb why` against the real control plane (and from files): each broken link of
//! the path gives its exact headline and a non-zero exit; a healthy Service in the lab
//! gives exit 0 and names the node that really answers ARP.

mod cluster;

use std::process::Command;
use std::time::Duration;

use cluster::lab::{World, pod};
use cluster::{Cluster, NAMESPACE, eventually};

/// `ferrolb why ARGS` as the cluster admin: (exit code, stdout).
fn why(cluster: &Cluster, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
        .arg("why")
        .args(args)
        .arg("--kubeconfig")
        .arg(cluster.cp.admin_kubeconfig())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.code().is_some(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap(), stdout)
}

/// The first line `ferrolb why` prints, with its exit code asserted to be 1.
fn broken(cluster: &Cluster, args: &[&str]) -> String {
    let (code, out) = why(cluster, args);
    assert_eq!(code, 1, "{out}");
    out.lines().next().unwrap_or_default().to_string()
}

fn service(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec: {{type: LoadBalancer, selector: {{app: {name}}}, ports: [{{port: 80, targetPort: 8080}}]{extra}}}\n"
    )
}

/// A speaker Pod on `node`, Ready, as the DaemonSet's would be (no kubelet runs here).
fn speaker_pod(cluster: &Cluster, node: &str) {
    let name = format!("ferrolb-speaker-{node}");
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NAMESPACE}, \
         labels: {{app.kubernetes.io/component: speaker}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: speaker, image: ferrolb}}]}}\n"
    ));
    cluster.kubectl(&[
        "patch",
        "pod",
        &name,
        "-n",
        NAMESPACE,
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}"#,
    ]);
}

/// The Pod the chart would run controller `name` in: in these tests the controller is a
/// process, and `why` judges a Lease with no ferrolb Pod left as an uninstalled one.
fn controller_pod(cluster: &Cluster, name: &str) {
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NAMESPACE}, \
         labels: {{app.kubernetes.io/component: controller}}}}\n\
         spec: {{containers: [{{name: controller, image: ferrolb}}]}}\n"
    ));
}

fn node(cluster: &Cluster, name: &str, labels: &str, ready: bool) {
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n"
    ));
    let status = serde_json::json!({"status": {"conditions": [
        {"type": "Ready", "status": if ready { "True" } else { "False" }, "reason": "Test", "message": "test"}
    ]}});
    cluster.kubectl(&[
        "patch",
        "node",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
}

async fn wait_ip(cluster: &Cluster, name: &str) -> String {
    eventually(
        Duration::from_secs(20),
        &format!("an IP for {name}"),
        || async {
            let ip = cluster.kubectl(&[
                "get",
                "svc",
                name,
                "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ]);
            (!ip.is_empty()).then_some(ip)
        },
    )
    .await
}

#[tokio::test]
async fn before_allocation_class_type_pools_and_the_controller() {
    let cluster = Cluster::start().await;
    assert_eq!(
        broken(&cluster, &["nosuch"]),
        "there is no Service default/nosuch"
    );
    cluster.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: plain, namespace: default}\n\
         spec: {ports: [{port: 80}]}\n",
    );
    assert_eq!(
        broken(&cluster, &["svc/plain"]),
        "default/plain is of type ClusterIP, not LoadBalancer: ferrolb serves LoadBalancer Services only"
    );
    cluster.apply(&service("other", ", loadBalancerClass: example.com/other"));
    assert_eq!(
        broken(&cluster, &["other"]),
        "default/other has loadBalancerClass example.com/other: that class's controller serves it, not ferrolb (which serves Services with no class or ferrolb.io/lb)"
    );
    cluster.apply(&service("web", ""));
    assert_eq!(
        broken(&cluster, &["web"]),
        "default/web is pending: no IPAddressPool exists"
    );
    cluster.apply(&cluster::pool("lab", &["198.51.100.10-198.51.100.20"]));
    assert_eq!(
        broken(&cluster, &["web"]),
        "default/web is pending because no ferrolb controller is active: there is no Lease ferrolb-system/ferrolb-controller: no controller has run there"
    );
    // A controller that ran and died: its Lease expires.
    let mut controller = cluster.controller("gone", &[]).await;
    wait_ip(&cluster, "web").await;
    // As after `helm uninstall`: the Lease is in date, but no ferrolb Pod is left (the
    // controller's RBAC went before it could release the Lease).
    assert_eq!(
        broken(&cluster, &["web"]),
        format!(
            "ferrolb is not running: no speaker Pod runs in namespace {NAMESPACE}, and no controller is active (its Lease names gone, but no ferrolb Pod runs in namespace {NAMESPACE})"
        )
    );
    controller.kill();
    cluster.apply(&service("late", ""));
    let headline = eventually(Duration::from_secs(20), "the Lease to expire", || async {
        let h = broken(&cluster, &["late"]);
        h.contains("was last renewed").then_some(h)
    })
    .await;
    assert!(
        headline.starts_with("default/late is pending because no ferrolb controller is active: its Lease ferrolb-system/ferrolb-controller was last renewed"),
        "{headline}"
    );
    assert!(headline.ends_with("s ago by gone"), "{headline}");
}

#[tokio::test]
async fn pools_closed_to_the_service_each_say_why() {
    let cluster = Cluster::start().await;
    let _controller = cluster.controller("a", &[]).await;
    cluster.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: team}\n\
         spec: {addresses: [198.51.100.10-198.51.100.11], serviceAllocation: {namespaces: [team]}}\n",
    );
    cluster.apply(&service("web", ""));
    assert_eq!(
        broken(&cluster, &["web"]),
        "default/web is pending: no IPv4 pool is open to this Service: pool \"team\" does not serve namespace \"default\" (spec.serviceAllocation)"
    );
    cluster.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: manual}\n\
         spec: {addresses: [198.51.100.30], autoAssign: false}\n",
    );
    let headline = broken(&cluster, &["web"]);
    assert!(
        headline.contains("pool \"manual\" has autoAssign false"),
        "{headline}"
    );
    // Ask for the manual pool by name: it gets its only address; then a second one is
    // refused as exhausted, and a third asks for a taken address.
    cluster.apply(&service("first", "").replace(
        "namespace: default}",
        "namespace: default, annotations: {ferrolb.io/address-pool: manual}}",
    ));
    assert_eq!(wait_ip(&cluster, "first").await, "198.51.100.30");
    cluster.apply(&service("second", "").replace(
        "namespace: default}",
        "namespace: default, annotations: {ferrolb.io/address-pool: manual}}",
    ));
    assert_eq!(
        broken(&cluster, &["second"]),
        "default/second is pending: pool \"manual\" is exhausted"
    );
    cluster.apply(&service("third", "").replace(
        "namespace: default}",
        "namespace: default, annotations: {ferrolb.io/loadBalancerIPs: 198.51.100.30}}",
    ));
    let headline = broken(&cluster, &["third"]);
    assert!(
        headline.starts_with(
            "default/third is pending: requested 198.51.100.30 is used by default/first"
        ),
        "{headline}"
    );
    cluster.apply(&service("bad", "").replace(
        "namespace: default}",
        "namespace: default, annotations: {ferrolb.io/loadBalancerIPs: banana}}",
    ));
    assert_eq!(
        broken(&cluster, &["bad"]),
        "default/bad is pending: annotation ferrolb.io/loadBalancerIPs: \"banana\" is not an IP address"
    );
}

#[tokio::test]
async fn assigned_but_not_announced_then_announced_but_nowhere_to_go() {
    let cluster = Cluster::start().await;
    let _controller = cluster.controller("a", &[]).await;
    cluster.apply(&cluster::pool("lab", &["198.51.100.10-198.51.100.20"]));
    cluster.apply(&service("web", ""));
    let ip = wait_ip(&cluster, "web").await;
    controller_pod(&cluster, "a");
    assert_eq!(
        broken(&cluster, &["web"]),
        format!(
            "{ip} is assigned but nobody answers for it: no L2Advertisement announces pool lab"
        )
    );
    cluster.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: lab}\n\
         spec: {nodeSelectors: [{matchLabels: {ferrolb: announce}}]}\n",
    );
    assert_eq!(
        broken(&cluster, &["web"]),
        format!("{ip} is assigned but no node may announce it: there are no Nodes")
    );
    node(&cluster, "node-a", "ferrolb: announce", false);
    node(
        &cluster,
        "node-b",
        "ferrolb: announce, node.kubernetes.io/exclude-from-external-load-balancers: \"\"",
        true,
    );
    node(&cluster, "node-c", "", true);
    assert_eq!(
        broken(&cluster, &["web"]),
        format!(
            "{ip} is assigned but no node may announce it: node-a: NotReady; node-b: labelled node.kubernetes.io/exclude-from-external-load-balancers; node-c: not matched by the L2Advertisement's nodeSelectors"
        )
    );
    node(&cluster, "node-d", "ferrolb: announce", true);
    assert_eq!(
        broken(&cluster, &["web"]),
        format!(
            "{ip} is assigned but no ready speaker runs on the nodes that may announce it (node-d: no speaker Pod)"
        )
    );
    speaker_pod(&cluster, "node-d");
    assert_eq!(
        broken(&cluster, &["web"]),
        format!(
            "{ip} is assigned and may be announced by node-d, but no speaker has reported announcing it"
        )
    );
    // What the controller writes when node-d's speaker hears another host answer for the
    // IP (no speaker runs in this test): why names that host and what to look for.
    let (status, reason, message) = ferrolb_api::announcement::condition_text(
        ip.parse().unwrap(),
        &["eth0".to_string()],
        Some(&ferrolb_api::OtherResponder {
            mac: "02:42:ac:12:00:0b".into(),
            node: None,
            held_back: true,
        }),
        "node-d",
    );
    let held = serde_json::json!({"status": {"conditions": [{
        "type": "ferrolb.io/AnnouncedIPv4", "status": status, "reason": reason,
        "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z",
    }]}});
    cluster.kubectl(&[
        "patch",
        "svc",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        &held.to_string(),
    ]);
    let headline = broken(&cluster, &["web"]);
    assert!(
        headline.starts_with(&format!(
            "another host answers for {ip}, not ferrolb: {ip} is answered by another host, MAC 02:42:ac:12:00:0b"
        )),
        "{headline}"
    );
    // What node-d's speaker writes once it announces (no speaker runs in this test).
    let condition = serde_json::json!({"status": {"conditions": [{
        "type": "ferrolb.io/AnnouncedIPv4", "status": "True", "reason": "NodeAssigned",
        "message": format!("{ip} is announced by node-d on eth0"),
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }]}});
    cluster.kubectl(&[
        "patch",
        "svc",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        &condition.to_string(),
    ]);
    let at = format!("{ip} is announced by node-d");
    assert_eq!(
        broken(&cluster, &["web"]),
        format!("{at}, but the selector app=web matches no Pod in namespace default")
    );
    pod(&cluster, "web-0", "web", "node-c", "10.244.0.5", false);
    pod(&cluster, "web-1", "web", "node-c", "10.244.0.6", false);
    assert_eq!(
        broken(&cluster, &["web"]),
        format!("{at}, but none of the 2 Pods matching app=web is Ready")
    );
    pod(&cluster, "web-0", "web", "node-c", "10.244.0.5", true);
    cluster.kubectl(&[
        "patch",
        "svc",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"ports":[{"port":80,"targetPort":8081}]}}"#,
    ]);
    assert_eq!(
        broken(&cluster, &["web"]),
        format!("{at}, but targetPort 8081 of port 80 is not a port the Pods expose (8080)")
    );
    cluster.kubectl(&[
        "patch",
        "svc",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"ports":[{"port":80,"targetPort":8080}],"externalTrafficPolicy":"Local"}}"#,
    ]);
    let headline = broken(&cluster, &["web"]);
    assert!(
        headline.contains("no node may announce it")
            && headline.contains("no ready endpoint here (externalTrafficPolicy: Local)"),
        "{headline}"
    );
    cluster.kubectl(&[
        "patch",
        "svc",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"externalTrafficPolicy":"Cluster"}}"#,
    ]);
    cluster.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: lab}\n\
         spec: {nodeSelectors: [{matchLabels: {ferrolb: announce}}], forwarding: nodePort}\n",
    );
    cluster.apply(&service("nonp", ", allocateLoadBalancerNodePorts: false"));
    let nonp = wait_ip(&cluster, "nonp").await;
    let condition = condition.to_string().replace(&ip, &nonp);
    cluster.kubectl(&[
        "patch",
        "svc",
        "nonp",
        "--subresource=status",
        "--type=merge",
        "-p",
        &condition,
    ]);
    assert_eq!(
        broken(&cluster, &["nonp"]),
        format!(
            "{nonp} is announced by node-d, but forwarding: nodePort has no NodePort to send port 80 to"
        )
    );
    // JSON for scripts says the same.
    let (code, json) = why(&cluster, &["nonp", "-o", "json"]);
    assert_eq!(code, 1);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["healthy"], false);
    assert!(
        json["headline"].as_str().unwrap().contains("no NodePort"),
        "{json}"
    );
}

#[tokio::test]
async fn a_healthy_service_in_the_lab_names_the_node_that_answers() {
    let mut w = World::start().await;
    for node in ["node0", "node1", "node2"] {
        speaker_pod(&w.cluster, node);
    }
    pod(&w.cluster, "web-0", "web", "node1", "10.244.1.5", true);
    let (vip, _) = w.service("web", "").await;
    let owner = w.owner(vip);
    w.wait_reported("web", vip, owner).await;
    let (code, out) = why(&w.cluster, &["web"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().next().unwrap(),
        format!(
            "default/web is healthy: {vip} announced by {}",
            w.lab.node(owner).name()
        )
    );
    assert!(out.contains("ready endpoints: web-0"), "{out}");
}

#[test]
fn from_files_without_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
            .arg("why")
            .args(args)
            .arg("-f")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        )
    };
    std::fs::write(dir.path().join("svc.yaml"), service("web", "")).unwrap();
    assert_eq!(
        run(&["web"]),
        (1, "default/web is pending: no IPAddressPool exists".into())
    );
    std::fs::write(
        dir.path().join("pool.yaml"),
        cluster::pool("lab", &["198.51.100.10-198.51.100.20"]),
    )
    .unwrap();
    assert_eq!(
        run(&["web"]),
        (1, "198.51.100.10 is assigned but nobody answers for it: no L2Advertisement announces pool lab".into())
    );
    std::fs::write(
        dir.path().join("rest.yaml"),
        "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: lab}\nspec: {}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: default, labels: {app: web}}\n\
         spec: {nodeName: node-a, containers: [{name: web, image: web, ports: [{containerPort: 8080}]}]}\n\
         status: {conditions: [{type: Ready, status: \"True\"}]}\n",
    )
    .unwrap();
    assert_eq!(
        run(&["web"]),
        (
            0,
            "default/web is healthy: 198.51.100.10 announced by node-a".into()
        )
    );
}

#[test]
fn a_from_node_network_pool_from_files_says_whether_it_is_resolved() {
    let dir = tempfile::tempdir().unwrap();
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
            .args(["why", "web", "-f"])
            .arg(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code().unwrap(), stdout)
    };
    std::fs::write(dir.path().join("svc.yaml"), service("web", "")).unwrap();
    let pool = "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: auto}\n\
                spec: {fromNodeNetwork: {size: 4}}\n";
    std::fs::write(dir.path().join("pool.yaml"), pool).unwrap();
    let (code, out) = run();
    assert_eq!(code, 1);
    assert!(
        out.starts_with("default/web is pending: no IPv4 pool is open to this Service: pool \"auto\" is not usable (pool \"auto\": spec.fromNodeNetwork is not resolved yet"),
        "{out}"
    );
    assert!(
        out.contains("next: a fromNodeNetwork pool gets its addresses from the speakers"),
        "{out}"
    );
    // As `kubectl get ippool -o yaml` shows it once a speaker resolved it.
    std::fs::write(
        dir.path().join("pool.yaml"),
        format!(
            "{pool}status: {{nodeNetwork: {{addresses: [198.51.100.30-198.51.100.33], \
             subnets: [198.51.100.0/24], resolvedBy: node-a}}}}\n"
        ),
    )
    .unwrap();
    let (_, out) = run();
    assert!(
        out.starts_with(
            "198.51.100.30 is assigned but nobody answers for it: no L2Advertisement announces pool auto"
        ),
        "{out}"
    );
}
