//! `ferrolb why` on failures made for real: Pods that never get Ready, a selector that
//! matches nothing, a pool with no address left, no speaker on the only eligible node,
//! and a speaker crash-looping there.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;
use serde::Deserialize;

use crate::cluster::{DEADLINE, NAMESPACE, poll};
use crate::{Suite, backend, load_balancer, namespace, report};

const NS: &str = "e2e-why";
const TAINT: &str = "e2e.ferrolb.io/no-speaker";

#[derive(Debug, Deserialize)]
pub struct Diagnosis {
    pub healthy: bool,
    pub headline: String,
    #[serde(default)]
    pub next: Option<String>,
    #[serde(default)]
    pub evidence: Vec<String>,
}

/// `ferrolb why NAME -n NAMESPACE -o json` against the cluster, as its admin.
pub fn why(suite: &Suite, namespace: &str, name: &str) -> Result<Diagnosis> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
        .args(["why", name, "-n", namespace, "-o", "json", "--kubeconfig"])
        .arg(&suite.cluster.kubeconfig)
        .output()?;
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "ferrolb why {namespace}/{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Polls `ferrolb why` until its headline contains every one of `words`.
fn until_says(suite: &Suite, name: &str, words: &[&str]) -> Result<Diagnosis> {
    suite.block_on(poll(
        &format!("ferrolb why {NS}/{name} to say {words:?}"),
        DEADLINE,
        || async {
            let d = why(suite, NS, name).ok()?;
            (!d.healthy && words.iter().all(|w| d.headline.contains(w))).then_some(d)
        },
    ))
}

pub fn explains_real_failures(suite: &Suite) -> Result<()> {
    suite.installed()?;
    let c = &suite.cluster;
    let nodes = suite.block_on(c.workers())?;
    let last = nodes.last().context("no nodes")?.0.clone();
    let one = c.top4(crate::pool::SPARE_FROM_TOP + 10, 1)[0];
    let pinned = c.top4(crate::pool::SPARE_FROM_TOP + 11, 1)[0];
    c.apply(&namespace(NS))?;
    c.apply(&format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: e2e-why-one}}\n\
         spec: {{addresses: [{one}/32], autoAssign: false}}\n---\n\
         apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: e2e-why-pinned}}\n\
         spec: {{addresses: [{pinned}/32], autoAssign: false}}\n---\n\
         apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: e2e-why-pinned}}\n\
         spec: {{ipAddressPools: [e2e-why-pinned], nodeSelectors: [{{matchLabels: {{kubernetes.io/hostname: {last}}}}}]}}\n---\n\
         {}---\n{}---\n{}---\n{}---\n{}---\n{}",
        // Listens on 8081 while its readiness probe asks 8080: never Ready.
        backend(suite, NS, "unready", 1, 8081, ""),
        load_balancer(NS, "unready", "unready", "", ""),
        load_balancer(NS, "nothing", "nothing", "", ""),
        load_balancer(NS, "first", "nothing", "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4]", "ferrolb.io/address-pool: e2e-why-one"),
        load_balancer(NS, "second", "nothing", "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4]", "ferrolb.io/address-pool: e2e-why-one"),
        load_balancer(NS, "pinned", "nothing", "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4]", "ferrolb.io/address-pool: e2e-why-pinned"),
    ))?;
    let result = (|| {
        for (name, words) in [
            ("unready", &["none of the 1 Pods", "is Ready"][..]),
            ("nothing", &["matches no Pod"][..]),
            ("second", &["pending", "e2e-why-one", "exhausted"][..]),
        ] {
            let d = until_says(suite, name, words)?;
            report!("{name}: {}", d.headline);
        }
        // The only node that may announce `pinned` loses its speaker (a taint it does
        // not tolerate), then gets it back crash-looping: something else holds the
        // speaker's metrics port on that node.
        c.kubectl(
            &["taint", "node", &last, &format!("{TAINT}=true:NoExecute")],
            None,
        )?;
        suite.block_on(poll(
            &format!("the speaker on {last} to be evicted"),
            DEADLINE,
            || async {
                let pods: Api<Pod> = Api::namespaced(c.client().await.ok()?, NAMESPACE);
                let list = pods
                    .list(
                        &ListParams::default()
                            .labels("app.kubernetes.io/component=speaker")
                            .fields(&format!("spec.nodeName={last}")),
                    )
                    .await
                    .ok()?;
                list.items.is_empty().then_some(())
            },
        ))?;
        let d = until_says(
            suite,
            "pinned",
            &["no ready speaker", &format!("{last}: no speaker Pod")],
        )?;
        report!("pinned, no speaker: {}", d.headline);
        c.apply(&squatter(suite, &last))?;
        c.kubectl(
            &[
                "wait",
                "-n",
                NS,
                "pod/squatter",
                "--for=condition=Ready",
                "--timeout=2m",
            ],
            None,
        )?;
        c.kubectl(&["taint", "node", &last, &format!("{TAINT}-")], None)?;
        let d = until_says(
            suite,
            "pinned",
            &["no ready speaker", "CrashLoopBackOff", "last exit code"],
        )?;
        ensure!(
            d.next.as_deref().is_some_and(|n| n.contains("--previous")),
            "why says to do {:?} about a crash-looping speaker",
            d.next
        );
        report!("pinned, speaker crash-looping: {}", d.headline);
        Ok(())
    })();
    // Leave the node as it was: no taint, no squatter, its speaker restarted now.
    let _ = c.kubectl(&["taint", "node", &last, &format!("{TAINT}-")], None);
    c.kubectl(
        &[
            "delete",
            "pod",
            "-n",
            NS,
            "squatter",
            "--ignore-not-found",
            "--wait=true",
        ],
        None,
    )?;
    c.kubectl(
        &[
            "delete",
            "pod",
            "-n",
            NAMESPACE,
            "-l",
            "app.kubernetes.io/component=speaker",
            "--field-selector",
            &format!("spec.nodeName={last}"),
        ],
        None,
    )?;
    c.kubectl(
        &[
            "rollout",
            "status",
            "-n",
            NAMESPACE,
            "daemonset/ferrolb-speaker",
            "--timeout=2m",
        ],
        None,
    )?;
    c.kubectl(&["delete", "namespace", NS, "--wait=false"], None)?;
    c.kubectl(
        &[
            "delete",
            "ipaddresspools.ferrolb.io",
            "e2e-why-one",
            "e2e-why-pinned",
        ],
        None,
    )?;
    c.kubectl(
        &["delete", "l2advertisements.ferrolb.io", "e2e-why-pinned"],
        None,
    )?;
    result
}

/// A host-network Pod on `node` that holds TCP port 7474, where the chart's speaker
/// serves its metrics; it tolerates the taint that keeps the speaker away.
fn squatter(suite: &Suite, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: squatter, namespace: {NS}}}\n\
         spec:\n  nodeName: {node}\n  hostNetwork: true\n  terminationGracePeriodSeconds: 1\n  \
         tolerations: [{{key: {TAINT}, operator: Exists, effect: NoExecute}}]\n  \
         containers:\n  - name: squatter\n    image: {}\n    imagePullPolicy: IfNotPresent\n    \
         args: [netexec, --http-port=7474]\n    readinessProbe: {{tcpSocket: {{port: 7474}}, periodSeconds: 1}}\n",
        suite.cluster.backend_image
    )
}
