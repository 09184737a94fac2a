//! `externalTrafficPolicy: Local`: only a node with a ready local endpoint announces, the
//! announcement follows the endpoint when it moves, and the backend sees the client's
//! own address.

use std::net::IpAddr;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;

use crate::client;
use crate::cluster::{DEADLINE, poll};
use crate::{Suite, backend, load_balancer, namespace, report};

const NS: &str = "e2e-local";

fn pinned(node: &str) -> String {
    format!("      nodeSelector: {{kubernetes.io/hostname: {node}}}")
}

pub fn follows_its_endpoint(suite: &Suite) -> Result<()> {
    suite.installed()?;
    let c = &suite.cluster;
    let nodes = suite.block_on(c.workers())?;
    ensure!(nodes.len() >= 2, "this needs two nodes");
    let (first, second) = (&nodes[0], &nodes[1]);
    c.apply(&namespace(NS))?;
    c.apply(&backend(suite, NS, "local", 1, 8080, &pinned(&first.0)))?;
    c.kubectl(
        &[
            "rollout",
            "status",
            "-n",
            NS,
            "deployment/local",
            "--timeout=2m",
        ],
        None,
    )?;
    c.apply(&load_balancer(
        NS,
        "local",
        "local",
        "  externalTrafficPolicy: Local\n  ipFamilyPolicy: SingleStack\n  ipFamilies: [IPv4]",
        "",
    ))?;
    let vip = suite.block_on(c.wait_ips(NS, "local", 1))?[0];
    let result = (|| {
        // Waits until `node` alone announces the VIP and checks the traffic: when the
        // announcement was seen there.
        // Each node's MAC, as its own address answers.
        let mut macs_of = std::collections::BTreeMap::new();
        for node in [first, second] {
            macs_of.insert(
                node.0.clone(),
                client::arping(&c.client, IpAddr::V4(node.1), client::ARP_POLL)?,
            );
        }
        let check = |node: &(String, std::net::Ipv4Addr)| -> Result<(Instant, Instant)> {
            let node_macs = &macs_of[&node.0];
            let said = suite.block_on(poll(
                &format!("{} to announce {vip}", node.0),
                DEADLINE,
                || async {
                    (c.announcer(NS, "local", vip).await.ok()?.as_deref() == Some(node.0.as_str()))
                        .then(Instant::now)
                },
            ))?;
            // Exactly one node answers, and it is the one with the endpoint.
            let deadline = Instant::now() + DEADLINE;
            loop {
                let macs = client::arping(&c.client, vip, client::ARP_POLL)?;
                if macs.len() == 1 && node_macs.contains(&macs[0]) {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{vip} is answered by {macs:02x?}, not only by {} ({node_macs:02x?})",
                    node.0
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let announced = Instant::now();
            let (answer, _) = client::wait_answer(&c.client, vip, DEADLINE)?;
            let seen: IpAddr = answer
                .client
                .rsplit_once(':')
                .map(|(ip, _)| ip.trim_matches(['[', ']']))
                .unwrap_or_default()
                .parse()
                .with_context(|| format!("the backend saw the client as {:?}", answer.client))?;
            ensure!(
                seen == answer.local.ip(),
                "the backend saw the client as {seen}, but the client is {}: its source address was not kept",
                answer.local.ip()
            );
            Ok((said, announced))
        };
        check(first)?;
        report!(
            "{vip} announced only by {}, where its endpoint is; the backend sees the client's own address",
            first.0
        );
        // Move the endpoint: the new Pod on the second node, the old one gone.
        c.apply(&backend(suite, NS, "local", 1, 8080, &pinned(&second.0)))?;
        // The moment the endpoints say so: ready on the second node only.
        let moved_at = suite.block_on(async {
            let slices: Api<EndpointSlice> = Api::namespaced(c.client().await?, NS);
            poll(
                &format!("the only ready endpoint to be on {}", second.0),
                DEADLINE,
                || async {
                    let list = slices
                        .list(&ListParams::default().labels("kubernetes.io/service-name=local"))
                        .await
                        .ok()?;
                    let ready: Vec<&str> = list
                        .items
                        .iter()
                        .flat_map(|s| s.endpoints.iter().flatten())
                        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                        .filter_map(|e| e.node_name.as_deref())
                        .collect();
                    (ready == [second.0.as_str()]).then(Instant::now)
                },
            )
            .await
        })?;
        c.kubectl(
            &[
                "rollout",
                "status",
                "-n",
                NS,
                "deployment/local",
                "--timeout=2m",
            ],
            None,
        )?;
        let (said, announced) = check(second)?;
        report!(
            "endpoint moved to {}: after the EndpointSlice said so, the condition named it within {} ms and it alone answered ARP within {} ms (all polled)",
            second.0,
            said.saturating_duration_since(moved_at).as_millis(),
            announced.saturating_duration_since(moved_at).as_millis()
        );
        Ok(())
    })();
    c.kubectl(&["delete", "namespace", NS, "--wait=false"], None)?;
    result
}
