//! The Helm chart with the real helm and the real API server: lint and template with
//! every feature, a schema that refuses typos, and install (every object accepted; the
//! chart's ServiceAccounts are enough to run the controller and the speakers, and a
//! Service gets an IP that answers), upgrade (the membership key and every IP stay) and
//! uninstall (nothing of ours left but the CRDs); and what the chart's speaker account may
//! write: its own node's NodeAnnouncement, nothing else.

mod cluster;

use std::process::Command;
use std::time::Duration;

use cluster::lab::World;
use cluster::{CHART, NAMESPACE, eventually};

fn helm(args: &[&str]) -> std::process::Output {
    let helm = ferrolb_control_plane::binary("helm").unwrap_or_else(|e| panic!("{e:#}"));
    let home = tempfile::tempdir().unwrap();
    Command::new(helm)
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every optional feature on.
const ALL_FEATURES: &str = r#"
pools:
  - name: lab
    addresses: [192.0.2.200-192.0.2.209]
    avoidBuggyIPs: true
l2Advertisements:
  - name: lab
    ipAddressPools: [lab]
    forwarding: nodePort
  - name: everywhere
prometheus:
  serviceMonitor: {enabled: true, labels: {release: prom}}
  podMonitor: {enabled: true}
  prometheusRule: {enabled: true, poolUsedPercent: 80}
speaker:
  memberlist: {existingSecret: my-key}
  priorityClassName: system-node-critical
  nodePortForwarding: {enabled: true}
  metricsBindAddress: 0.0.0.0
controller:
  priorityClassName: system-cluster-critical
  nodeSelector: {kubernetes.io/os: linux}
loadBalancerClass: example.com/ferrolb
logFormat: text
"#;

fn values_file(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

fn kinds(rendered: &str) -> Vec<String> {
    let mut kinds: Vec<String> = rendered
        .lines()
        .filter_map(|l| l.strip_prefix("kind: "))
        .map(str::to_string)
        .collect();
    kinds.sort();
    kinds
}

#[test]
fn lint_and_template_with_defaults_and_every_feature() {
    ok(helm(&["lint", CHART, "--strict"]));
    let all = values_file(ALL_FEATURES);
    let all = all.path().to_str().unwrap();
    ok(helm(&["lint", CHART, "--strict", "-f", all]));

    let default = ok(helm(&["template", "ferrolb", CHART, "-n", NAMESPACE]));
    assert_eq!(
        kinds(&default),
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "DaemonSet",
            "Deployment",
            "PodDisruptionBudget",
            "Role",
            "Role",
            "RoleBinding",
            "RoleBinding",
            "Secret",
            "ServiceAccount",
            "ServiceAccount",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ]
    );
    // The speaker gets exactly NET_RAW, unprivileged, on the host network, and serves its
    // metrics on the node's IP only.
    let speaker = default
        .split("\n---")
        .find(|d| d.contains("kind: DaemonSet"))
        .unwrap();
    for line in [
        "hostNetwork: true",
        "privileged: false",
        "allowPrivilegeEscalation: false",
        "readOnlyRootFilesystem: true",
        "drop: [ALL]",
        "add: [NET_RAW]\n",
        "--node-port-forwarding=false",
        "--arp-in-kernel=false",
        "fieldPath: spec.nodeName",
        "--metrics-address=$(NODE_IP):7474",
        "fieldPath: status.hostIP",
    ] {
        assert!(speaker.contains(line), "no `{line}` in\n{speaker}");
    }

    let everything = ok(helm(&[
        "template", "ferrolb", CHART, "-n", NAMESPACE, "-f", all,
    ]));
    for kind in [
        "IPAddressPool",
        "L2Advertisement",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "Service",
    ] {
        assert!(kinds(&everything).iter().any(|k| k == kind), "no {kind}");
    }
    // Bringing one's own key: no Secret generated, and the speakers use it.
    assert!(!kinds(&everything).iter().any(|k| k == "Secret"));
    assert!(everything.contains("secretName: my-key"));
    // Rendered without a cluster (helm template, as Argo CD does) with one's own key,
    // nothing is random: every render is the same, so a sync changes nothing and
    // restarts no speaker.
    let again = ok(helm(&[
        "template", "ferrolb", CHART, "-n", NAMESPACE, "-f", all,
    ]));
    assert_eq!(everything, again, "two renders differ");
    assert!(everything.contains("--load-balancer-class=example.com/ferrolb"));
    // NodePort forwarding, and only it, brings CAP_NET_ADMIN (nftables).
    assert!(everything.contains("add: [NET_RAW, NET_ADMIN]"));
    assert!(everything.contains("--node-port-forwarding=true"));
    assert!(everything.contains("--metrics-address=0.0.0.0:7474"));

    // ARP in the kernel brings CAP_BPF and CAP_NET_ADMIN (a tc program), and only it.
    let in_kernel = ok(helm(&[
        "template",
        "ferrolb",
        CHART,
        "-n",
        NAMESPACE,
        "--set",
        "speaker.arpInKernel.enabled=true",
    ]));
    assert!(in_kernel.contains("add: [NET_RAW, NET_ADMIN, BPF]\n"));
    assert!(in_kernel.contains("--arp-in-kernel=true"));
}

#[test]
fn an_advertisement_asking_for_forwarding_without_its_capability_is_refused_by_name() {
    let f = values_file("l2Advertisements:\n  - name: lab\n    forwarding: nodePort\n");
    let out = helm(&[
        "template",
        "ferrolb",
        CHART,
        "-f",
        f.path().to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "forwarding without NET_ADMIN was accepted"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("l2Advertisements lab: forwarding: nodePort needs speaker.nodePortForwarding.enabled=true"),
        "{stderr}"
    );
}

#[test]
fn the_schema_refuses_typos_and_wrong_types() {
    for (values, want) in [
        (
            "controler:\n  replicas: 2\n",
            "additional properties 'controler' not allowed",
        ),
        ("controller:\n  replicas: two\n", "controller/replicas"),
        ("logFormat: yaml\n", "logFormat"),
        (
            "speaker:\n  memberlist:\n    port: 70000\n",
            "speaker/memberlist/port",
        ),
        (
            "pools:\n  - addresses: [192.0.2.0/24]\n",
            "missing property 'name'",
        ),
    ] {
        let f = values_file(values);
        let out = helm(&[
            "template",
            "ferrolb",
            CHART,
            "-f",
            f.path().to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "{values} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{values}: {stderr}");
    }
}

#[tokio::test]
async fn install_runs_with_the_charts_accounts_upgrade_keeps_everything_uninstall_cleans_up() {
    // World::start installs the chart (helm install) and runs the controller and three
    // speakers with tokens of the chart's own ServiceAccounts.
    let mut w = World::start().await;
    let status = w
        .cluster
        .helm(&["status", "ferrolb", "-n", NAMESPACE, "-o", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["info"]["status"], "deployed");
    for object in [
        "deployment/ferrolb-controller",
        "daemonset/ferrolb-speaker",
        "poddisruptionbudget/ferrolb-controller",
        "secret/ferrolb-memberlist",
    ] {
        w.cluster.kubectl(&["get", "-n", NAMESPACE, object]);
    }
    let (vip, _) = w.service("web", "").await;
    let owner = w.owner(vip);
    eventually(Duration::from_secs(20), "TCP through the VIP", || async {
        w.connects(vip).then_some(())
    })
    .await;
    let key = || {
        w.cluster.kubectl(&[
            "get",
            "secret",
            "-n",
            NAMESPACE,
            "ferrolb-memberlist",
            "-o",
            "jsonpath={.data.secretkey}",
        ])
    };
    let key_before = key();
    assert_eq!(key_before.len(), 88, "64 random characters, base64");

    w.cluster.helm(&[
        "upgrade",
        "ferrolb",
        CHART,
        "-n",
        NAMESPACE,
        "--set",
        "logLevel=debug",
    ]);
    assert_eq!(key(), key_before, "helm upgrade changed the membership key");
    let ip = w.cluster.kubectl(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.status.loadBalancer.ingress[0].ip}",
    ]);
    assert_eq!(ip, vip.to_string());
    assert_eq!(w.owner(vip), owner);
    let args = w.cluster.kubectl(&[
        "get",
        "-n",
        NAMESPACE,
        "daemonset/ferrolb-speaker",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].env[0].value}",
    ]);
    assert_eq!(args, "debug");

    w.cluster.helm(&["uninstall", "ferrolb", "-n", NAMESPACE]);
    let left = w.cluster.kubectl(&[
        "get",
        "all,secrets,serviceaccounts,roles,rolebindings,poddisruptionbudgets,clusterroles,clusterrolebindings",
        "-A",
        "-l",
        "app.kubernetes.io/instance=ferrolb",
        "-o",
        "name",
    ]);
    assert_eq!(left.trim(), "", "left behind by helm uninstall");
    // Helm's convention: CRDs (and so the user's pools) stay.
    w.cluster
        .kubectl(&["get", "crd", "ipaddresspools.ferrolb.io"]);
    w.cluster.kubectl(&["get", "ippool", "lab"]);
}

/// A NodeAnnouncement for `node`, by server-side apply as the speaker writes it.
async fn apply_record(client: &kube::Client, node: &str) -> Result<(), kube::Error> {
    use ferrolb_api::NodeAnnouncement;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<NodeAnnouncement> = Api::namespaced(client.clone(), NAMESPACE);
    let record = serde_json::json!({
        "apiVersion": "ferrolb.io/v1beta1",
        "kind": "NodeAnnouncement",
        "metadata": {"name": node},
        "spec": {"count": 1, "ips": [{"ip": "192.0.2.10", "interfaces": ["eth0"],
            "services": ["default/web"], "since": "2026-01-01T00:00:00.000000Z"}]},
    });
    api.patch(
        node,
        &PatchParams::apply("ferrolb-speaker").force(),
        &Patch::Apply(record),
    )
    .await
    .map(drop)
}

fn refused(result: Result<(), kube::Error>, what: &str) -> String {
    match result {
        Ok(()) => panic!("{what} was allowed"),
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{what}: {e:?}");
            e.message
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Issue 21, item 3: a speaker (a compromised node) may write its own node's record and
/// nothing else: not another node's record, not any Service's status, and with a token
/// bound to no node, no record at all. Tokens of the chart's own ServiceAccount, the
/// chart's RBAC and policy, the real API server.
#[tokio::test]
async fn a_speaker_may_write_only_its_own_nodes_record_and_no_service_status() {
    use ferrolb_api::NodeAnnouncement;
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, DeleteParams, Patch, PatchParams};

    let cluster = cluster::Cluster::start().await;
    for node in ["node-a", "node-b"] {
        cluster.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n"
        ));
    }
    cluster.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {type: LoadBalancer, ports: [{port: 80}]}\n",
    );
    let token = cluster::lab::speaker_token(&cluster, "node-a").await;
    let kubeconfig = cluster
        .cp
        .token_kubeconfig("speaker-a.kubeconfig", &cluster.cp.server(), &token)
        .unwrap();
    let speaker_a = ferrolb_control_plane::client_for(&kubeconfig)
        .await
        .unwrap();

    // Another node's record: refused once the policy is in force (the API server loads
    // policies asynchronously after helm install).
    let message = eventually(
        Duration::from_secs(20),
        "the policy to refuse node-b's record",
        || async {
            match apply_record(&speaker_a, "node-b").await {
                Ok(()) => {
                    let admin: Api<NodeAnnouncement> =
                        Api::namespaced(cluster.client().await, NAMESPACE);
                    admin
                        .delete("node-b", &DeleteParams::default())
                        .await
                        .unwrap();
                    None
                }
                Err(e) => Some(refused(Err(e), "node-a's speaker creating node-b's record")),
            }
        },
    )
    .await;
    assert!(
        message.contains(
            "the speaker on node 'node-a' may write only its own NodeAnnouncement, not 'node-b'"
        ),
        "{message}"
    );
    // Its own: allowed, created and changed.
    apply_record(&speaker_a, "node-a").await.unwrap();
    apply_record(&speaker_a, "node-a").await.unwrap();

    // node-b's record, written by node-b's speaker: node-a may neither change nor delete it.
    let token_b = cluster::lab::speaker_token(&cluster, "node-b").await;
    let kubeconfig_b = cluster
        .cp
        .token_kubeconfig("speaker-b.kubeconfig", &cluster.cp.server(), &token_b)
        .unwrap();
    let speaker_b = ferrolb_control_plane::client_for(&kubeconfig_b)
        .await
        .unwrap();
    apply_record(&speaker_b, "node-b").await.unwrap();
    refused(
        apply_record(&speaker_a, "node-b").await,
        "node-a's speaker changing node-b's record",
    );
    let as_a: Api<NodeAnnouncement> = Api::namespaced(speaker_a.clone(), NAMESPACE);
    refused(
        as_a.patch(
            "node-b",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"ips": []}})),
        )
        .await
        .map(drop),
        "node-a's speaker merge-patching node-b's record",
    );
    refused(
        as_a.delete("node-b", &DeleteParams::default())
            .await
            .map(drop),
        "node-a's speaker deleting node-b's record",
    );

    // No Service's status, not even the announced condition.
    let services: Api<Service> = Api::namespaced(speaker_a.clone(), "default");
    let condition = serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
        "status": {"conditions": [{"type": "ferrolb.io/AnnouncedIPv4", "status": "True",
            "reason": "NodeAssigned", "message": "192.0.2.10 is announced by node-a on eth0",
            "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    });
    let message = refused(
        services
            .patch_status(
                "web",
                &PatchParams::apply("ferrolb-speaker-ipv4").force(),
                &Patch::Apply(condition),
            )
            .await
            .map(drop),
        "the speaker writing a Service's condition",
    );
    assert!(message.contains("services/status"), "{message}");
    let message = refused(
        services
            .patch_status(
                "web",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.66"}]}}})),
            )
            .await
            .map(drop),
        "the speaker writing a Service's IPs",
    );
    assert!(message.contains("services/status"), "{message}");

    // A token of the same account bound to no Pod (so to no node): no record at all.
    let unbound = cluster
        .cp
        .token(NAMESPACE, "ferrolb-speaker")
        .await
        .unwrap();
    let kubeconfig = cluster
        .cp
        .token_kubeconfig("speaker-unbound.kubeconfig", &cluster.cp.server(), &unbound)
        .unwrap();
    let unbound = ferrolb_control_plane::client_for(&kubeconfig)
        .await
        .unwrap();
    for node in ["node-a", "node-c"] {
        let message = refused(
            apply_record(&unbound, node).await,
            &format!("an unbound token writing {node}'s record"),
        );
        assert!(message.contains("bound to no node"), "{message}");
    }

    // Leaving: its own record may be deleted.
    as_a.delete("node-a", &DeleteParams::default())
        .await
        .unwrap();
    let admin: Api<NodeAnnouncement> = Api::namespaced(cluster.client().await, NAMESPACE);
    let left: Vec<String> = admin
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|r| r.metadata.name)
        .collect();
    assert_eq!(left, ["node-b"]);
}
