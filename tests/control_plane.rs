//! The test control plane itself, proven against what the rest of the suite relies on:
//! the real API server accepts ferrolb's CRDs and enforces their CEL rules, RBAC is on,
//! kube-controller-manager turns Pods into EndpointSlices, and lab nodes reach the API
//! server over the lab's network.

use std::time::{Duration, Instant};

use ferrolb_control_plane::{ControlPlane, Options};
use serde_json::Value;

const CRDS: &str = include_str!("../charts/ferrolb/crds/crds.yaml");

async fn control_plane() -> ControlPlane {
    ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// Polls `f` every 50 ms until it returns `Some`, or panics naming `what`.
fn eventually<T>(deadline: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn install_crds(cp: &ControlPlane) {
    cp.apply(CRDS).unwrap();
    cp.kubectl_run(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/ipaddresspools.ferrolb.io",
            "crd/l2advertisements.ferrolb.io",
            "crd/nodeannouncements.ferrolb.io",
        ],
        None,
    )
    .unwrap();
}

fn pool(name: &str, entry: &str) -> String {
    format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: {name}}}\n\
         spec: {{addresses: [\"{entry}\"]}}\n"
    )
}

#[tokio::test]
async fn binaries_are_the_pinned_releases() {
    let cp = control_plane().await;
    let version = cp.kubectl_run(&["version", "-o", "json"], None).unwrap();
    let version: Value = serde_json::from_str(&version).unwrap();
    let go_mod = include_str!("control-plane/go.mod");
    let pinned = go_mod
        .lines()
        .find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes "))
        .unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], pinned, "{version}");
    assert_eq!(version["clientVersion"]["gitVersion"], pinned, "{version}");
}

#[tokio::test]
async fn crds_are_served_with_their_printer_columns() {
    let cp = control_plane().await;
    install_crds(&cp);
    cp.apply(&pool("lab", "192.0.2.0/24")).unwrap();
    let table = cp.kubectl_run(&["get", "ipaddresspools"], None).unwrap();
    let header = table.lines().next().unwrap();
    for column in [
        "NAME",
        "ADDRESSES",
        "AUTO ASSIGN",
        "READY",
        "ASSIGNED IPV4",
        "AVAILABLE IPV4",
        "ASSIGNED IPV6",
        "AVAILABLE IPV6",
        "AGE",
    ] {
        assert!(header.contains(column), "no {column} in {table}");
    }
    assert!(table.contains("[\"192.0.2.0/24\"]"), "{table}");
    // The default the schema declares is applied by the server.
    let auto = cp
        .kubectl_run(
            &["get", "ippool", "lab", "-o", "jsonpath={.spec.autoAssign}"],
            None,
        )
        .unwrap();
    assert_eq!(auto, "true");
}

#[tokio::test]
async fn the_server_enforces_every_cel_rule_with_its_message() {
    let cp = control_plane().await;
    install_crds(&cp);
    for good in [
        "192.168.10.0/24",
        "fd00::/120",
        "192.168.10.10-192.168.10.20",
        "fd00::10-fd00::20",
        "10.0.0.7",
    ] {
        cp.apply(&pool("good", good))
            .unwrap_or_else(|e| panic!("{good} was refused: {e:#}"));
    }
    let cases = [
        ("banana", "must be a CIDR"),
        ("10.0.0.1-", "must be a CIDR"),
        ("10.0.0.1-fd00::1", "must be a CIDR"),
        ("10.0.0.256", "must be a CIDR"),
        ("192.168.10.5/24", "host bits set"),
        // What plan refuses too, though client-side CEL (kube-cel) takes it.
        ("10.0.0.024/32", "must be a CIDR"),
        ("fd00::/024", "must be a CIDR"),
        ("0.0.0.0/0", "covers the whole address family"),
    ];
    for (entry, message) in cases {
        let err = cp.apply(&pool("bad", entry)).unwrap_err().to_string();
        assert!(err.contains(message), "{entry}: {err}");
        assert!(err.contains("spec.addresses[0]"), "{entry}: {err}");
    }
    // Exactly one of addresses and fromNodeNetwork, checked by the server itself.
    cp.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: auto}\n\
         spec: {fromNodeNetwork: {size: 16, families: [IPv4]}}\n",
    )
    .unwrap_or_else(|e| panic!("a fromNodeNetwork pool was refused: {e:#}"));
    for spec in [
        "{}",
        "{addresses: [10.1.0.0/24], fromNodeNetwork: {size: 16}}",
        "{fromNodeNetwork: {size: 0}}",
        "{fromNodeNetwork: {size: 4, families: [IPv5]}}",
    ] {
        let err = cp
            .apply(&format!(
                "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: both}}\nspec: {spec}\n"
            ))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("set exactly one of spec.addresses")
                || err.contains("spec.fromNodeNetwork."),
            "{spec}: {err}"
        );
    }
    cp.kubectl_run(&["delete", "ipaddresspool", "auto"], None)
        .unwrap();
    let err = cp
        .apply(
            "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: x}\n\
             spec: {forwarding: iptables}\n",
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("spec.forwarding"), "{err}");
    assert!(err.contains("\"nodePort\""), "{err}");
    // Issue 23, item 4: the gratuitous ARP policy's bounds, each refusal naming its field.
    let ad = |gratuitous: &str| {
        format!(
            "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: g}}\n\
             spec: {{gratuitous: {gratuitous}}}\n"
        )
    };
    for (gratuitous, field, message) in [
        (
            "{count: 0}",
            "spec.gratuitous.count",
            "greater than or equal to 1",
        ),
        (
            "{count: 31}",
            "spec.gratuitous.count",
            "less than or equal to 30",
        ),
        (
            "{intervalMilliseconds: 5}",
            "spec.gratuitous.intervalMilliseconds",
            "greater than or equal to 10",
        ),
        (
            "{refreshSeconds: 3}",
            "spec.gratuitous",
            "refreshSeconds is 0 (off) or at least 10",
        ),
    ] {
        let err = cp.apply(&ad(gratuitous)).unwrap_err().to_string();
        assert!(
            err.contains(field) && err.contains(message),
            "{gratuitous}: {err}"
        );
        // plan refuses the same in a file, naming the same field.
        let problem: String = ferrolb_api::manifests::Manifests::default()
            .add_text("ad.yaml", &ad(gratuitous))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            problem.contains(field),
            "{gratuitous}: plan says {problem:?}"
        );
    }
    // Node priorities are bounded too.
    let err = cp
        .apply(
            "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: p}\n\
             spec: {nodePriorities: [{priority: 5000, nodeSelector: {}}]}\n",
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("spec.nodePriorities[0].priority")
            && err.contains("less than or equal to 1000"),
        "{err}"
    );
    for gratuitous in [
        "{count: 1, intervalMilliseconds: 10, refreshSeconds: 0}",
        "{count: 30, intervalMilliseconds: 60000, refreshSeconds: 86400}",
        "{refreshSeconds: 10}",
    ] {
        cp.apply(&ad(gratuitous))
            .unwrap_or_else(|e| panic!("{gratuitous} was refused: {e:#}"));
    }
    let names = cp
        .kubectl_run(&["get", "ipaddresspools", "-o", "name"], None)
        .unwrap();
    assert_eq!(names.trim(), "ipaddresspool.ferrolb.io/good");
}

/// Issue 22, item 4: what MetalLB refuses as a repeat, ferrolb's CRDs refuse too, naming
/// the field; the same lists without the repeat are taken.
#[tokio::test]
async fn repeated_namespaces_pools_interfaces_and_selectors_are_refused() {
    let cp = control_plane().await;
    install_crds(&cp);
    let pool = |allocation: &str| {
        format!(
            "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: p}}\n\
             spec: {{addresses: [10.0.0.0/28], serviceAllocation: {allocation}}}\n"
        )
    };
    let ad = |spec: &str| {
        format!(
            "apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: a}}\nspec: {spec}\n"
        )
    };
    let cases = [
        (
            pool("{namespaces: [shop, web, shop]}"),
            "spec.serviceAllocation.namespaces[2]",
            "Duplicate value",
        ),
        (
            pool("{namespaceSelectors: [{matchLabels: {a: b}}, {matchLabels: {a: b}}]}"),
            "spec.serviceAllocation.namespaceSelectors",
            "lists the same selector twice",
        ),
        (
            pool("{serviceSelectors: [{matchLabels: {a: b}}, {matchLabels: {a: b}}]}"),
            "spec.serviceAllocation.serviceSelectors",
            "lists the same selector twice",
        ),
        (
            ad("{ipAddressPools: [p, p]}"),
            "spec.ipAddressPools[1]",
            "Duplicate value",
        ),
        (
            ad("{interfaces: [eth0, eth0]}"),
            "spec.interfaces[1]",
            "Duplicate value",
        ),
        (
            ad("{nodeSelectors: [{matchLabels: {a: b}}, {matchLabels: {a: b}}]}"),
            "spec.nodeSelectors",
            "lists the same selector twice",
        ),
        (
            ad("{ipAddressPoolSelectors: [{matchLabels: {a: b}}, {matchLabels: {a: b}}]}"),
            "spec.ipAddressPoolSelectors",
            "lists the same selector twice",
        ),
    ];
    for (yaml, field, message) in &cases {
        let err = cp.apply(yaml).unwrap_err().to_string();
        assert!(
            err.contains(field) && err.contains(message),
            "{yaml}: {err}"
        );
    }
    for yaml in [
        pool(
            "{namespaces: [shop, web], namespaceSelectors: [{matchLabels: {a: b}}, {matchLabels: {a: c}}]}",
        ),
        ad(
            "{ipAddressPools: [p, q], interfaces: [eth0, eth1], nodeSelectors: [{matchLabels: {a: b}}, {matchLabels: {a: c}}]}",
        ),
    ] {
        cp.apply(&yaml)
            .unwrap_or_else(|e| panic!("{yaml} was refused: {e:#}"));
    }
}

#[tokio::test]
async fn rbac_refuses_a_service_account_without_bindings() {
    let cp = control_plane().await;
    cp.kubectl_run(&["create", "serviceaccount", "nobody"], None)
        .unwrap();
    // `kubectl create token` goes through the TokenRequest API, as a kubelet would.
    let token = cp
        .kubectl_run(&["create", "token", "nobody"], None)
        .unwrap();
    let kubeconfig = cp
        .token_kubeconfig("nobody.kubeconfig", &cp.server(), token.trim())
        .unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = std::process::Command::new(ferrolb_control_plane::binary("kubectl").unwrap());
        cmd.arg("--kubeconfig").arg(&kubeconfig).args(args);
        ferrolb_control_plane::run(&mut cmd, None).unwrap()
    };
    let whoami = as_nobody(&[
        "auth",
        "whoami",
        "-o",
        "jsonpath={.status.userInfo.username}",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        "system:serviceaccount:default:nobody"
    );
    let denied = as_nobody(&["get", "services", "-n", "default"]);
    assert!(!denied.status.success());
    let stderr = String::from_utf8_lossy(&denied.stderr);
    assert!(stderr.contains("Forbidden"), "{stderr}");
    assert!(
        stderr.contains("cannot list resource \"services\""),
        "{stderr}"
    );

    cp.kubectl_run(
        &[
            "create",
            "role",
            "read-services",
            "--verb=list",
            "--resource=services",
        ],
        None,
    )
    .unwrap();
    cp.kubectl_run(
        &[
            "create",
            "rolebinding",
            "nobody-reads",
            "--role=read-services",
            "--serviceaccount=default:nobody",
        ],
        None,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the RoleBinding to apply", || {
        as_nobody(&["get", "services", "-n", "default"])
            .status
            .success()
            .then_some(())
    });
    assert!(
        !as_nobody(&["get", "services", "-n", "kube-system"])
            .status
            .success()
    );
}

#[tokio::test]
async fn ready_pods_become_endpoint_slices() {
    let cp = control_plane().await;
    cp.apply(
        r#"
apiVersion: v1
kind: Node
metadata: {name: node-a}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: default, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{name: web, image: web, ports: [{containerPort: 8080}]}]
"#,
    )
    .unwrap();
    let set_ready = |ready: bool| {
        let status = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": "10.244.0.5",
            "podIPs": [{"ip": "10.244.0.5"}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        }});
        cp.kubectl_run(
            &[
                "patch",
                "pod",
                "web-0",
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ],
            None,
        )
        .unwrap();
    };
    let endpoint = || -> Option<Value> {
        let out = cp
            .kubectl_run(
                &[
                    "get",
                    "endpointslices",
                    "-l",
                    "kubernetes.io/service-name=web",
                    "-o",
                    "json",
                ],
                None,
            )
            .ok()?;
        let list: Value = serde_json::from_str(&out).ok()?;
        list["items"][0]["endpoints"][0]
            .as_object()
            .map(|e| Value::Object(e.clone()))
    };
    set_ready(true);
    let e = eventually(Duration::from_secs(20), "a ready endpoint", || {
        endpoint().filter(|e| e["conditions"]["ready"] == true)
    });
    assert_eq!(e["addresses"][0], "10.244.0.5");
    assert_eq!(e["nodeName"], "node-a");
    set_ready(false);
    eventually(
        Duration::from_secs(20),
        "the endpoint to turn not ready",
        || endpoint().filter(|e| e["conditions"]["ready"] == false),
    );
}

#[tokio::test]
async fn lab_nodes_reach_the_api_server_over_the_lab_network() {
    use ferrolb::lab::{GATEWAY_IPV4, Lab};
    if let Err(missing) = Lab::check_prerequisites() {
        panic!("{missing}");
    }
    let cp = ControlPlane::start_with(Options {
        extra_ips: vec![GATEWAY_IPV4.into()],
        ..Options::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let lab = Lab::new(1).unwrap();
    let relay = lab
        .relay(6443, ([127, 0, 0, 1], cp.apiserver_port()).into())
        .unwrap();
    cp.kubectl_run(&["create", "serviceaccount", "speaker"], None)
        .unwrap();
    let token = cp.token("default", "speaker").await.unwrap();
    let kubeconfig = cp
        .token_kubeconfig(
            "speaker.kubeconfig",
            &format!("https://{}", relay.address()),
            &token,
        )
        .unwrap();
    let kubectl = ferrolb_control_plane::binary("kubectl").unwrap();
    let out = lab
        .node(0)
        .run(
            &kubectl,
            [
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
                "auth",
                "whoami",
                "-o",
                "jsonpath={.status.userInfo.username}",
            ],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "system:serviceaccount:default:speaker"
    );
    // The node has no route to the machine's loopback: only the lab network leads there.
    let direct = lab
        .node(0)
        .command(
            &kubectl,
            [
                "--kubeconfig",
                cp.admin_kubeconfig().to_str().unwrap(),
                "--request-timeout=2s",
                "get",
                "--raw",
                "/version",
            ],
        )
        .output()
        .unwrap();
    assert!(!direct.status.success());
}
