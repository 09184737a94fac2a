//! The chart as users run it: `helm install --wait`, `helm upgrade`, `helm uninstall`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::ListParams;

use crate::client::{self, Kept};
use crate::cluster::{CHART, DEADLINE, NAMESPACE, RELEASE, poll};
use crate::{Suite, WEB_NAMESPACE, report};

const SPEAKERS: &str = "app.kubernetes.io/component=speaker";

/// `helm install --wait` with a `fromNodeNetwork` pool (no address written) and an
/// L2Advertisement for it, as docs/install.md says for kind: how long it took. On a
/// tests/nodes cluster the client first takes the top address of each subnet, which the
/// pool must then pass over.
pub fn install(suite: &Suite) -> Result<Duration> {
    let c = &suite.cluster;
    let (repository, tag) = c
        .image
        .rsplit_once(':')
        .with_context(|| format!("FERROLB_IMAGE={} has no tag", c.image))?;
    crate::pool::occupy(c)?;
    let pools =
        serde_json::json!([{"name": "e2e", "fromNodeNetwork": {"size": crate::pool::SIZE}}]);
    let advertisements = serde_json::json!([{"name": "e2e", "ipAddressPools": ["e2e"]}]);
    let started = Instant::now();
    c.helm(&[
        "install",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--set",
        &format!("image.repository={repository}"),
        "--set",
        &format!("image.tag={tag}"),
        "--set-json",
        &format!("pools={pools}"),
        "--set-json",
        &format!("l2Advertisements={advertisements}"),
        "--wait",
        "--timeout",
        "5m",
    ])?;
    Ok(started.elapsed())
}

/// The controller Deployment and the speaker DaemonSet run as real Pods with the chart's
/// RBAC, securityContext and limits, and become Ready; the controller holds its Lease;
/// the speakers start without an error.
pub fn installs(suite: &Suite) -> Result<()> {
    let took = suite.installed()?;
    let c = &suite.cluster;
    suite.block_on(async {
        let client = c.client().await?;
        let nodes = c.node_ips().await?;
        let deployment = Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
            .get("ferrolb-controller")
            .await?;
        let ready = deployment.status.and_then(|s| s.ready_replicas).unwrap_or(0);
        ensure!(ready == 2, "the controller Deployment has {ready} Ready replicas, not 2");
        let daemonset = Api::<DaemonSet>::namespaced(client.clone(), NAMESPACE)
            .get("ferrolb-speaker")
            .await?;
        let status = daemonset.status.context("the speaker DaemonSet has no status")?;
        ensure!(
            status.number_ready as usize == nodes.len(),
            "{} of {} speakers are Ready",
            status.number_ready,
            nodes.len()
        );
        let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE)
            .list(&ListParams::default().labels(SPEAKERS))
            .await?;
        for pod in &pods.items {
            let security = pod
                .spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .and_then(|c| c.security_context.clone())
                .context("a speaker Pod without a securityContext")?;
            let added = security.capabilities.and_then(|c| c.add).unwrap_or_default();
            ensure!(
                added == ["NET_RAW"] && security.privileged == Some(false),
                "a speaker runs with {added:?} (privileged {:?})",
                security.privileged
            );
        }
        let lease = Api::<Lease>::namespaced(client.clone(), NAMESPACE)
            .get("ferrolb-controller")
            .await?;
        let holder = lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
        ensure!(
            holder.starts_with("ferrolb-controller-"),
            "the controller Lease is held by {holder:?}, not a controller Pod"
        );
        // Each speaker writes its own node's record, with the token the kubelet gives its
        // Pod, through the chart's policy (issue 21, item 3).
        let mut want: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
        want.sort();
        let records = Api::<ferrolb_api::NodeAnnouncement>::namespaced(client.clone(), NAMESPACE);
        poll("a NodeAnnouncement per node, each written by its speaker", DEADLINE, || async {
            let mut names: Vec<String> = records
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .filter_map(|r| r.metadata.name)
                .collect();
            names.sort();
            (names == want).then_some(())
        })
        .await?;
        report!(
            "helm install --wait: {:.1} s until the controller (2/2) and {} speakers were Ready; Lease held by {holder}",
            took.as_secs_f64(),
            nodes.len()
        );
        Ok::<_, anyhow::Error>(())
    })?;
    // Starting is not an error: nothing is logged at ERROR before the first list.
    let logs = speaker_logs(suite)?;
    let errors: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(r#""level":"ERROR""#))
        .collect();
    ensure!(
        errors.is_empty(),
        "speakers logged errors while starting:\n{}",
        errors.join("\n")
    );
    Ok(())
}

/// Every LoadBalancer Service's IPs, by namespace/name.
async fn all_ips(suite: &Suite) -> Result<BTreeMap<String, Vec<IpAddr>>> {
    let services = Api::<Service>::all(suite.cluster.client().await?)
        .list(&ListParams::default())
        .await?;
    Ok(services
        .items
        .iter()
        .map(|s| {
            let key = format!(
                "{}/{}",
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default()
            );
            (key, ferrolb_allocator::input::ingress_ips(s))
        })
        .filter(|(_, ips)| !ips.is_empty())
        .collect())
}

async fn speaker_pods(suite: &Suite) -> Result<Vec<String>> {
    let pods = Api::<Pod>::namespaced(suite.cluster.client().await?, NAMESPACE)
        .list(&ListParams::default().labels(SPEAKERS))
        .await?;
    Ok(pods
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect())
}

/// `helm upgrade` that rolls every speaker and controller: no Service's IP changes, and
/// the client's traffic keeps flowing (new connections measured every 20 ms, and one
/// connection kept open across the roll). The upgrade turns on ARP in the kernel
/// (`speaker.arpInKernel.enabled`): the kubelet runs the speakers with the chart's
/// added capabilities under the runtime's default seccomp profile, and the speakers
/// attach their program where they answer.
pub fn upgrade(suite: &Suite) -> Result<()> {
    let web = suite.web()?;
    let c = &suite.cluster;
    let vip = web.ips[0];
    let before = suite.block_on(all_ips(suite))?;
    let speakers_before = suite.block_on(speaker_pods(suite))?;
    let done = Arc::new(AtomicBool::new(false));
    let probes = client::probe_until(&c.client, vip, done.clone());
    let mut kept = Kept::open(&c.client, vip, 80)?;
    kept.get("/hostname")?;
    let started = Instant::now();
    let upgraded = c.helm(&[
        "upgrade",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--reuse-values",
        "--set",
        "logLevel=info\\,ferrolb_speaker=debug",
        "--set",
        "speaker.arpInKernel.enabled=true",
        "--wait",
        "--timeout",
        "5m",
    ]);
    let rolled = upgraded.and_then(|_| {
        c.kubectl(
            &[
                "rollout",
                "status",
                "-n",
                NAMESPACE,
                "daemonset/ferrolb-speaker",
                "--timeout=3m",
            ],
            None,
        )
    });
    let took = started.elapsed();
    let kept_survived = kept.get("/hostname");
    done.store(true, Ordering::Relaxed);
    let gaps = probes
        .join()
        .map_err(|_| anyhow::anyhow!("the probing thread panicked"))??;
    rolled?;
    let after = suite.block_on(all_ips(suite))?;
    ensure!(
        before == after,
        "helm upgrade moved IPs: before {before:?}, after {after:?}"
    );
    let speakers_after = suite.block_on(speaker_pods(suite))?;
    ensure!(
        speakers_after.iter().all(|p| !speakers_before.contains(p)),
        "helm upgrade did not replace every speaker: before {speakers_before:?}, after {speakers_after:?}"
    );
    client::wait_answer(&c.client, vip, Duration::from_secs(10))
        .context("traffic did not come back after the upgrade")?;
    let attached = in_kernel(suite)?;
    report!(
        "helm upgrade --wait (every speaker and controller replaced): {:.1} s; {} IPs of {} Services unchanged; ARP answered in the kernel on {attached} link(s)",
        took.as_secs_f64(),
        after.values().map(Vec::len).sum::<usize>(),
        after.len()
    );
    report!(
        "new connections to {vip} every 20 ms: {} of {} failed, longest gap {} ms; a connection kept open: {}",
        gaps.failed,
        gaps.probes,
        gaps.longest.as_millis(),
        match kept_survived {
            Ok(_) => "still answers".to_string(),
            Err(e) => format!("broke ({e:#})"),
        }
    );
    Ok(())
}

/// Every speaker's whole log, each line prefixed with its Pod.
fn speaker_logs(suite: &Suite) -> Result<String> {
    suite.cluster.kubectl(
        &[
            "logs",
            "-n",
            NAMESPACE,
            "-l",
            SPEAKERS,
            "--prefix",
            "--tail=-1",
        ],
        None,
    )
}

/// How many links the speakers answer ARP on in the kernel, after an upgrade that turned
/// it on: at least one (the VIPs' owners'), and no speaker that could not attach it.
fn in_kernel(suite: &Suite) -> Result<usize> {
    let logs = speaker_logs(suite)?;
    let failed: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("cannot answer ARP in the kernel"))
        .collect();
    ensure!(
        failed.is_empty(),
        "speakers could not answer ARP in the kernel:\n{}",
        failed.join("\n")
    );
    let attached = logs
        .lines()
        .filter(|l| l.contains("answering ARP in the kernel"))
        .count();
    ensure!(
        attached > 0,
        "no speaker says it answers ARP in the kernel:\n{logs}"
    );
    Ok(attached)
}

/// `helm uninstall` stops every speaker and controller, and no node keeps an nftables
/// table, an address or an ARP answer of ferrolb's; `ferrolb why` then says ferrolb is
/// not running.
pub fn uninstall(suite: &Suite) -> Result<()> {
    let web = suite.web()?;
    let c = &suite.cluster;
    c.helm(&[
        "uninstall",
        RELEASE,
        "--namespace",
        NAMESPACE,
        "--wait",
        "--timeout",
        "3m",
    ])?;
    suite.block_on(async {
        let pods: Api<Pod> = Api::namespaced(c.client().await?, NAMESPACE);
        poll("every ferrolb Pod to be gone", DEADLINE, || async {
            pods.list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        })
        .await
    })?;
    let nodes = suite.block_on(c.node_ips())?;
    if c.nodes.is_some() {
        for (node, _) in &nodes {
            let tables = c.node(node, &["exec", "nft", "list", "tables"])?;
            ensure!(
                !tables.contains("ferrolb"),
                "{node} keeps nftables tables after uninstall: {tables}"
            );
            let addresses = c.node(node, &["exec", "ip", "-o", "addr"])?;
            for ip in &web.ips {
                ensure!(
                    !addresses.contains(&format!(" {ip}/")),
                    "{node} keeps the address {ip} after uninstall"
                );
            }
        }
    } else {
        report!(
            "(nftables tables and addresses on the nodes not checked: not a tests/nodes cluster)"
        );
    }
    for ip in web.ips.iter().filter(|ip| ip.is_ipv4()) {
        let macs = client::arping(&c.client, *ip, Duration::from_secs(1))?;
        ensure!(
            macs.is_empty(),
            "{ip} is still answered after uninstall, by {macs:02x?}"
        );
    }
    let why = crate::why::why(suite, WEB_NAMESPACE, "web")?;
    ensure!(
        !why.healthy && why.headline.contains("not running"),
        "ferrolb why after uninstall says: {}",
        why.headline
    );
    report!(
        "after helm uninstall: no table, address or ARP answer left on {} nodes; why: {}",
        nodes.len(),
        why.headline
    );
    // The release's pools went with it, but the Services keep their IPs until they are
    // deleted (docs/install.md, "Upgrade and uninstall").
    let left = suite.block_on(all_ips(suite))?;
    if left.is_empty() {
        bail!("the Services lost their IPs on uninstall; docs/install.md says they keep them");
    }
    Ok(())
}
