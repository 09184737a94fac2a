//! A LoadBalancer Service as users make one, reached from the client through the
//! announcing node's real kube-proxy.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::ListParams;

use crate::client;
use crate::cluster::{DEADLINE, poll};
use crate::{Suite, WEB_NAMESPACE, Web, backend, load_balancer, namespace, report};

/// Three backend Pods and a LoadBalancer Service for them; the Service's IPs once each
/// answers, and how long that took from the Service's creation.
pub fn create_web(suite: &Suite) -> Result<(Web, Duration)> {
    let c = &suite.cluster;
    c.apply(&namespace(WEB_NAMESPACE))?;
    c.apply(&backend(suite, WEB_NAMESPACE, "web", 3, 8080, ""))?;
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
    )?;
    let started = Instant::now();
    c.apply(&load_balancer(WEB_NAMESPACE, "web", "web", "", ""))?;
    let families = if c.subnet6.is_some() { 2 } else { 1 };
    let ips = suite.block_on(c.wait_ips(WEB_NAMESPACE, "web", families))?;
    for ip in &ips {
        client::wait_answer(&c.client, *ip, DEADLINE)?;
    }
    Ok((Web { ips }, started.elapsed()))
}

/// The Service gets an IP of each family from the pool, and the client reaches the
/// backend Pods through it; kube-proxy spreads the connections over them.
pub fn answers(suite: &Suite) -> Result<()> {
    let web = suite.web()?;
    let c = &suite.cluster;
    let pods: BTreeSet<String> = suite.block_on(async {
        let pods = Api::<Pod>::namespaced(c.client().await?, WEB_NAMESPACE)
            .list(&ListParams::default().labels("app=web"))
            .await?;
        Ok::<_, anyhow::Error>(
            pods.items
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .collect(),
        )
    })?;
    for ip in &web.ips {
        let mut seen = BTreeSet::new();
        for _ in 0..30 {
            let answer = client::ask(&c.client, *ip)?;
            ensure!(
                pods.contains(&answer.pod),
                "{ip} was answered by {}, which is not a backend Pod ({pods:?})",
                answer.pod
            );
            seen.insert(answer.pod);
        }
        ensure!(
            seen.len() > 1,
            "30 connections to {ip} all reached {seen:?}: kube-proxy did not spread them"
        );
        let node = suite.block_on(c.announcer(WEB_NAMESPACE, "web", *ip))?;
        report!(
            "{ip}: 30 requests answered by {} of {} backend Pods; announced by {}",
            seen.len(),
            pods.len(),
            node.as_deref().unwrap_or("(no condition)")
        );
    }
    Ok(())
}

/// On every node in turn (an L2Advertisement pinned to it), the VIP answers ARP with
/// that node's MAC and its kube-proxy, in whatever mode it runs, carries the traffic.
pub fn every_proxy_mode(suite: &Suite) -> Result<()> {
    suite.web()?;
    let c = &suite.cluster;
    let nodes = suite.block_on(c.workers())?;
    let mut objects = String::new();
    for (i, (node, _)) in nodes.iter().enumerate() {
        let ip = c.top4(crate::pool::SPARE_FROM_TOP + i as u32, 1)[0];
        objects.push_str(&format!(
            "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: e2e-pin-{i}}}\n\
             spec: {{addresses: [{ip}/32], autoAssign: false}}\n---\n\
             apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: e2e-pin-{i}}}\n\
             spec: {{ipAddressPools: [e2e-pin-{i}], nodeSelectors: [{{matchLabels: {{kubernetes.io/hostname: {node}}}}}]}}\n---\n{}---\n",
            load_balancer(
                WEB_NAMESPACE,
                &format!("pin-{i}"),
                "web",
                "  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4]",
                &format!("ferrolb.io/address-pool: e2e-pin-{i}"),
            )
        ));
    }
    c.apply(&objects)?;
    let result = (|| {
        let mut modes = Vec::new();
        for (i, (node, node_ip)) in nodes.iter().enumerate() {
            let name = format!("pin-{i}");
            let vip = suite.block_on(c.wait_ips(WEB_NAMESPACE, &name, 1))?[0];
            suite.block_on(poll(
                &format!("{node} to announce {vip}"),
                DEADLINE,
                || async {
                    (c.announcer(WEB_NAMESPACE, &name, vip)
                        .await
                        .ok()?
                        .as_deref()
                        == Some(node))
                    .then_some(())
                },
            ))?;
            let (_, took) = client::wait_answer(&c.client, vip, DEADLINE)?;
            let vip_macs = client::arping(&c.client, vip, client::ARP_POLL)?;
            let node_macs = client::arping(&c.client, IpAddr::V4(*node_ip), client::ARP_POLL)?;
            ensure!(
                !vip_macs.is_empty() && vip_macs.iter().all(|m| node_macs.contains(m)),
                "{vip} is answered by {vip_macs:02x?}, {node} ({node_ip}) by {node_macs:02x?}"
            );
            let mode = client::get(&c.client, IpAddr::V4(*node_ip), 10249, "/proxyMode")
                .map(|(m, _)| m.trim().to_string())
                .unwrap_or_else(|_| "unknown (kube-proxy's metrics port is not reachable)".into());
            if let Some(expected) =
                (!c.proxy_modes.is_empty()).then(|| &c.proxy_modes[i % c.proxy_modes.len()])
            {
                ensure!(
                    &mode == expected,
                    "{node}'s kube-proxy runs in {mode}, not {expected}"
                );
            }
            report!(
                "{vip} on {node}: ARP answered with {node}'s MAC, traffic through kube-proxy ({mode}) within {} ms",
                took.as_millis()
            );
            modes.push(mode);
        }
        Ok::<_, anyhow::Error>(modes)
    })();
    let mut names = Vec::new();
    for i in 0..nodes.len() {
        names.push(format!("service/pin-{i}"));
    }
    let mut args = vec!["delete", "-n", WEB_NAMESPACE, "--wait=false"];
    args.extend(names.iter().map(String::as_str));
    c.kubectl(&args, None)?;
    let pinned: Vec<String> = (0..nodes.len()).map(|i| format!("e2e-pin-{i}")).collect();
    for kind in ["l2advertisements.ferrolb.io", "ipaddresspools.ferrolb.io"] {
        let mut args = vec!["delete", kind];
        args.extend(pinned.iter().map(String::as_str));
        c.kubectl(&args, None)?;
    }
    let modes = result.context("traffic through each node")?;
    let distinct: BTreeSet<&String> = modes.iter().collect();
    report!("kube-proxy modes carried the VIP: {distinct:?}");
    Ok(())
}
