//! Failover as users cause it, measured as the client sees it: new TCP connections to
//! the VIP every 10 ms while the node announcing it loses its speaker, its link, its
//! workloads or its kubelet. Each round ends with the cluster settled again: every
//! speaker Ready, and the Service's condition naming the node whose MAC answers ARP.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::ListParams;

use crate::bench::spread;
use crate::client;
use crate::cluster::{DEADLINE, NAMESPACE, poll};
use crate::{Suite, WEB_NAMESPACE, report};

/// Runs `rounds` of: settle, find the owner, disrupt it while measuring, restore.
fn rounds(
    suite: &Suite,
    cause: &str,
    disrupt: impl Fn(&str) -> Result<()>,
    restore: impl Fn(&str) -> Result<()>,
) -> Result<()> {
    let web = suite.web()?;
    let c = &suite.cluster;
    let vip = web.ips[0];
    let mut outages = Vec::new();
    for round in 1..=suite.rounds() {
        let owner = settle(suite, vip)?;
        let measured = client::outage(&c.client, vip, || disrupt(&owner));
        let meanwhile = suite
            .block_on(c.announcer(WEB_NAMESPACE, "web", vip))
            .ok()
            .flatten()
            .unwrap_or_else(|| "nobody".into());
        // Restore even when the measurement failed, so later cases find the node back.
        let restored = restore(&owner);
        let (outage, (failed, all)) = measured.with_context(|| format!("{cause} on {owner}"))?;
        restored.with_context(|| format!("restoring {owner} after {cause}"))?;
        report!(
            "round {round}: {cause} on {owner}: outage {} ms, then {failed} of {all} new connections failed over 3 s; meanwhile announced by {meanwhile}",
            outage.as_millis()
        );
        outages.push(outage);
    }
    let owner = settle(suite, vip)?;
    report!(
        "{cause}: outage {}; {vip} settled on {owner}",
        spread(&outages)
    );
    Ok(())
}

/// Waits until the cluster is whole: every speaker and backend Ready, the VIP answered
/// with exactly one MAC, and the Service's condition naming the node of that MAC (the
/// condition tells the truth on the wire). The owner's name.
pub fn settle(suite: &Suite, vip: IpAddr) -> Result<String> {
    let c = &suite.cluster;
    let nodes = suite.block_on(c.node_ips())?;
    suite.block_on(async {
        let client = c.client().await?;
        let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), NAMESPACE);
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), WEB_NAMESPACE);
        poll(
            "every speaker and backend to be Ready",
            DEADLINE,
            || async {
                let ds = daemonsets.get("ferrolb-speaker").await.ok()?.status?;
                let web = deployments.get("web").await.ok()?.status?;
                (ds.number_ready == ds.desired_number_scheduled
                    && ds.updated_number_scheduled == Some(ds.desired_number_scheduled)
                    && web.ready_replicas == Some(3))
                .then_some(())
            },
        )
        .await
    })?;
    let (owner, _) = on_the_wire_until(suite, &nodes, vip, DEADLINE, |_| true)?;
    Ok(owner)
}

/// Polls until the Service's condition and the wire agree on a node that `wanted`
/// takes: ARP for `vip` answered by exactly one MAC, that node's, the condition naming
/// it, and the VIP serving. That node, and how long it took.
fn on_the_wire_until(
    suite: &Suite,
    nodes: &[(String, std::net::Ipv4Addr)],
    vip: IpAddr,
    deadline: Duration,
    wanted: impl Fn(&str) -> bool,
) -> Result<(String, Duration)> {
    let c = &suite.cluster;
    let start = std::time::Instant::now();
    loop {
        let said = suite.block_on(c.announcer(WEB_NAMESPACE, "web", vip))?;
        let macs = client::arping(&c.client, vip, client::ARP_POLL)?;
        let mut wire = None;
        if let [mac] = macs.as_slice() {
            for (node, ip) in nodes {
                if client::arping(&c.client, IpAddr::V4(*ip), client::ARP_POLL)?.contains(mac) {
                    wire = Some(node.clone());
                }
            }
        }
        match (&said, &wire) {
            (Some(s), Some(w)) if s == w && wanted(s) && client::ask(&c.client, vip).is_ok() => {
                return Ok((s.clone(), start.elapsed()));
            }
            _ => {}
        }
        let last =
            format!("the condition says {said:?}, ARP is answered by {macs:02x?} ({wire:?})");
        if start.elapsed() > deadline {
            bail!(
                "{vip} did not settle as wanted within {} s: {last}",
                deadline.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 23, item 2: the owner's kube-proxy stops, and its health server with it. The
/// VIP moves to a node whose kube-proxy passes its check (the rules a stopped
/// kube-proxy leaves behind go stale at the next change of endpoints: the node cannot be
/// trusted to deliver); when kube-proxy runs again the VIP comes back, as election
/// gives it to that node.
pub fn kube_proxy_stopped(suite: &Suite) -> Result<()> {
    let web = suite.web()?;
    let c = &suite.cluster;
    let vip = web.ips[0];
    let nodes = suite.block_on(c.node_ips())?;
    let mut moves = Vec::new();
    let mut backs = Vec::new();
    for round in 1..=suite.rounds() {
        let owner = settle(suite, vip)?;
        let mut moved = None;
        let measured = client::outage(&c.client, vip, || {
            c.node(&owner, &["stop", "kube-proxy"])?;
            moved = Some(on_the_wire_until(
                suite,
                &nodes,
                vip,
                Duration::from_secs(30),
                |n| n != owner,
            )?);
            // `ferrolb why` names the node passed over, and why, from its record.
            let passed_over = format!(
                "passed over while another node can deliver: {owner} (kube-proxy fails its health check: "
            );
            let said = suite.block_on(poll(
                "ferrolb why to name the node whose kube-proxy fails",
                Duration::from_secs(30),
                || async {
                    let d = crate::why::why(suite, WEB_NAMESPACE, "web").ok()?;
                    d.evidence
                        .iter()
                        .find(|e| e.starts_with(&passed_over))
                        .cloned()
                },
            ))?;
            report!("ferrolb why web: {said}");
            Ok(())
        });
        // Start it again even when the VIP did not move, so later cases find it running.
        let restarted = c.node(&owner, &["start", "kube-proxy"]);
        let (outage, (failed, all)) =
            measured.with_context(|| format!("kube-proxy stopped on {owner}"))?;
        restarted.with_context(|| format!("starting kube-proxy on {owner} again"))?;
        let (to, took) = moved.context("the VIP did not move")?;
        let (back, back_after) =
            on_the_wire_until(suite, &nodes, vip, Duration::from_secs(60), |n| n == owner)
                .with_context(|| format!("{vip} back on {owner} once its kube-proxy runs"))?;
        report!(
            "round {round}: kube-proxy stopped on {owner}: {vip} announced by {to} {} ms later (condition and ARP); \
             outage {} ms, then {failed} of {all} new connections failed over 3 s; back on {back} {} ms after kube-proxy started",
            took.as_millis(),
            outage.as_millis(),
            back_after.as_millis()
        );
        moves.push(took);
        backs.push(back_after);
    }
    report!(
        "kube-proxy stopped: moved after {}; back after {}",
        spread(&moves),
        spread(&backs)
    );
    Ok(())
}

/// The speaker Pod on `node`.
fn speaker_on(suite: &Suite, node: &str) -> Result<Pod> {
    suite.block_on(async {
        let pods: Api<Pod> = Api::namespaced(suite.cluster.client().await?, NAMESPACE);
        let list = pods
            .list(
                &ListParams::default()
                    .labels("app.kubernetes.io/component=speaker")
                    .fields(&format!("spec.nodeName={node}")),
            )
            .await?;
        list.items
            .into_iter()
            .next()
            .with_context(|| format!("no speaker Pod on {node}"))
    })
}

/// `kubectl delete pod` of the owner's speaker: it withdraws, the DaemonSet makes a new
/// one. The disruption ends when the old Pod is gone.
pub fn speaker_pod_deleted(suite: &Suite) -> Result<()> {
    let c = &suite.cluster;
    rounds(
        suite,
        "speaker Pod deleted",
        |owner| {
            let pod = speaker_on(suite, owner)?;
            let name = pod.metadata.name.unwrap_or_default();
            c.kubectl(
                &["delete", "pod", "-n", NAMESPACE, &name, "--wait=true"],
                None,
            )
            .map(drop)
        },
        |_| Ok(()),
    )
}

/// SIGKILL of the owner's speaker container (what an OOM kill or a crash does); the
/// kubelet restarts it.
pub fn speaker_container_killed(suite: &Suite) -> Result<()> {
    let c = &suite.cluster;
    rounds(
        suite,
        "speaker container killed",
        |owner| {
            let id = c.node(owner, &["crictl", "ps", "--name", "^speaker$", "-q"])?;
            let id = id
                .lines()
                .next()
                .context("no running speaker container")?
                .to_string();
            let pid = c.node(
                owner,
                &[
                    "crictl",
                    "inspect",
                    "-o",
                    "go-template",
                    "--template",
                    "{{.info.pid}}",
                    &id,
                ],
            )?;
            let pid: i32 = pid
                .trim()
                .parse()
                .with_context(|| format!("crictl inspect {id}: pid {pid:?}"))?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .with_context(|| format!("killing the speaker (pid {pid})"))?;
            // Gone when its /proc entry is (a zombie is reaped by its shim at once).
            while std::path::Path::new(&format!("/proc/{pid}/status")).exists()
                && !std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap_or_default()
                    .contains("State:\tZ")
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        },
        |_| Ok(()),
    )
}

/// The owner's link to the segment goes down (its switch port), then comes back.
pub fn link_cut(suite: &Suite) -> Result<()> {
    let c = &suite.cluster;
    rounds(
        suite,
        "link cut",
        |owner| c.node(owner, &["link", "down"]).map(drop),
        |owner| c.node(owner, &["link", "up"]).map(drop),
    )
}

/// `kubectl drain` of the owner (cordon, evict its backends; the speaker, a DaemonSet
/// Pod, stays), then `kubectl uncordon`.
pub fn drained(suite: &Suite) -> Result<()> {
    let c = &suite.cluster;
    rounds(
        suite,
        "drain",
        |owner| {
            c.kubectl(
                &[
                    "drain",
                    owner,
                    "--ignore-daemonsets",
                    "--delete-emptydir-data",
                    "--timeout=2m",
                ],
                None,
            )
            .map(drop)
        },
        |owner| {
            c.kubectl(&["uncordon", owner], None)?;
            c.kubectl(
                &[
                    "rollout",
                    "status",
                    "-n",
                    WEB_NAMESPACE,
                    "deployment/web",
                    "--timeout=2m",
                ],
                None,
            )
            .map(drop)
        },
    )
}

/// The owner's kubelet stops: the disruption lasts until the node is NotReady (the node
/// lifecycle controller's grace period); then the kubelet starts again.
pub fn kubelet_stopped(suite: &Suite) -> Result<()> {
    let c = &suite.cluster;
    let ready = |node: &str, want: bool| {
        suite.block_on(async {
            let nodes: Api<Node> = Api::all(c.client().await?);
            poll(
                &format!("{node} to be {}", if want { "Ready" } else { "NotReady" }),
                Duration::from_secs(180),
                || async {
                    let n = nodes.get(node).await.ok()?;
                    let is = n
                        .status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    (is == want).then_some(())
                },
            )
            .await
        })
    };
    rounds(
        suite,
        "kubelet stopped",
        |owner| {
            c.node(owner, &["stop", "kubelet"])?;
            ready(owner, false)
        },
        |owner| {
            c.node(owner, &["start", "kubelet"])?;
            ready(owner, true)
        },
    )
}

/// `ferrolb drain OWNER` with the client opening connections every 20 ms, then
/// `ferrolb drain --undo OWNER`: every IP the node announced moves away and comes back,
/// and no new connection fails either way.
pub fn ferrolb_drain(suite: &Suite) -> Result<()> {
    let web = suite.web()?;
    let c = &suite.cluster;
    let vip = web.ips[0];
    let nodes = suite.block_on(c.node_ips())?;
    let owner = settle(suite, vip)?;
    let ferrolb = |args: &[&str]| -> Result<String> {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrolb"))
            .args(args)
            .arg("--kubeconfig")
            .arg(&c.kubeconfig)
            .output()?;
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("ferrolb {} failed ({}): {said}", args.join(" "), out.status);
        }
        Ok(said)
    };
    let probed = |step: &dyn Fn() -> Result<String>| -> Result<(String, client::Gaps)> {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let probes = client::probe_until(&c.client, vip, done.clone());
        let said = step();
        // Keep probing a moment after the command returns: clients still update.
        std::thread::sleep(Duration::from_secs(1));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let gaps = probes
            .join()
            .map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
        Ok((said?, gaps))
    };
    let (drained, away) = probed(&|| ferrolb(&["drain", &owner]))?;
    let (to, _) = on_the_wire_until(suite, &nodes, vip, Duration::from_secs(10), |n| n != owner)?;
    report!("ferrolb drain {owner}:\n{}", indent(&drained));
    let (undone, back) = probed(&|| ferrolb(&["drain", "--undo", &owner]))?;
    // Back where the election puts it: the drained node, or the hash's first choice if
    // that one has meanwhile settled (a node cut off by an earlier case holds off for a
    // while), but not the stand-in.
    let (home, _) = on_the_wire_until(suite, &nodes, vip, DEADLINE, |n| n != to)?;
    report!("ferrolb drain --undo {owner}:\n{}", indent(&undone));
    report!(
        "drain: {vip} moved {owner} → {to}, {} of {} new connections failed (longest gap {} ms); \
         undo: back on {home}, {} of {} failed (longest gap {} ms)",
        away.failed,
        away.probes,
        away.longest.as_millis(),
        back.failed,
        back.probes,
        back.longest.as_millis()
    );
    if away.failed > 0 || back.failed > 0 {
        bail!(
            "connections were lost: {} while draining, {} while undoing",
            away.failed,
            back.failed
        );
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
