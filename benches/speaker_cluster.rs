//! The speaker in a cluster, in the network-namespace lab against a real control plane:
//! API requests the speakers make at rest with 100 Services (from the API server's audit
//! log), writes per failover, resident memory watching 1,000 Services, and the outage when
//! the owner dies (its link cut and its speaker SIGKILLed at once, as when a node loses
//! power; 10 rounds) in cluster mode next to standalone mode on the same lab. Killing only
//! the speaker cuts nothing: the DNAT rules stay in the kernel and the client's ARP cache
//! still points at the node, which keeps carrying the traffic. Prints figures; asserts
//! nothing but that the run worked.
//!
//! `cargo bench -p ferrolb --bench speaker_cluster`, as root (the lab needs it).

#[path = "../tests/cluster/mod.rs"]
mod cluster;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use cluster::lab::{VIP_PORT, World};
use cluster::{bench, eventually};
use ferrolb::lab::{LabProcess, format_duration, measure_tcp_outage};
use ferrolb_control_plane::Options;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;

const SPEAKER_USER: &str = "system:serviceaccount:ferrolb-system:ferrolb-speaker";
const KILLS: usize = 10;

fn main() {
    bench::main(run);
}

async fn run() {
    let mut w = World::start_with(Options {
        audit: true,
        ..Options::default()
    })
    .await;
    let (vip, node_port) = w.service("web", "").await;
    w.cluster.apply(&cluster::pool(
        "bulk",
        &["192.0.2.128-192.0.2.199", "198.18.0.0/20"],
    ));
    create(&w, 1, 100).await;
    wait_reported(&w, 100).await;
    let mut rows: Vec<(String, String)> = Vec::new();

    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = bench::requests(&w.cluster.cp, SPEAKER_USER);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let rest = bench::since(&before, &bench::requests(&w.cluster.cp, SPEAKER_USER));
    rows.push((
        "speaker requests per minute at rest, 3 speakers, 100 Services".into(),
        bench::describe(&rest),
    ));

    // Cluster mode: kill the owner's speaker, measure, bring it back, wait until it owns
    // the VIP again (after its rejoin hold-down).
    let mut outages = Vec::new();
    let mut writes_per_ip = Vec::new();
    for round in 0..KILLS {
        let owner = w.owner(vip);
        let owned = owned_by(&w, owner).await;
        let before = bench::requests(&w.cluster.cp, SPEAKER_USER);
        let killed = w.speakers[owner].take().unwrap();
        let node = w.lab.node(owner).clone();
        let outage = measure_tcp_outage(
            w.lab.client(),
            SocketAddr::new(vip, VIP_PORT),
            || {
                node.set_link(false)?;
                killed.kill_hard()
            },
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
        outages.push(outage.duration);
        node.set_link(true).unwrap();
        // Every IP the dead node owned is reported by its new owner.
        eventually(
            Duration::from_secs(30),
            "every moved IP reported",
            || async { (owned_by(&w, owner).await == 0).then_some(()) },
        )
        .await;
        let writes: usize = bench::since(&before, &bench::requests(&w.cluster.cp, SPEAKER_USER))
            .iter()
            .filter(|((verb, _), _)| verb == "patch" || verb == "create")
            .map(|(_, n)| n)
            .sum();
        writes_per_ip.push(writes as f64 / owned.max(1) as f64);
        eprintln!(
            "cluster mode, kill {}: outage {}, {owned} IPs moved, {writes} writes",
            round + 1,
            format_duration(outage.duration)
        );
        w.speakers[owner] = Some(w.spawn_speaker(owner));
        eventually(
            Duration::from_secs(30),
            "the VIP back on its first owner",
            || async { (w.owner(vip) == owner).then_some(()) },
        )
        .await;
    }
    rows.push((
        "failover outage, cluster mode (median / max of 10)".into(),
        bench::spread(&outages),
    ));
    rows.push((
        "speaker writes per IP moved by a failover".into(),
        format!(
            "{:.2} (a condition patch and an Event per Service)",
            writes_per_ip.iter().sum::<f64>() / writes_per_ip.len() as f64
        ),
    ));

    create(&w, 100, 1000).await;
    wait_reported(&w, 1000).await;
    let rss: Vec<f64> = w
        .speakers
        .iter()
        .flatten()
        .map(|s| bench::rss_mib(s.pid()))
        .collect();
    rows.push((
        "speaker resident memory, 1,000 Services".into(),
        rss.iter()
            .map(|r| format!("{r:.1} MiB"))
            .collect::<Vec<_>>()
            .join(", "),
    ));

    // Standalone mode on the same lab and backends: the same VIP from files.
    for s in w.speakers.iter_mut() {
        if let Some(s) = s.take() {
            s.terminate().unwrap();
        }
    }
    let dir = w.cluster.cp.dir().join("standalone");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("nodes.yaml"), w.lab.node_manifests()).unwrap();
    std::fs::write(dir.join("objects.yaml"), standalone_objects(vip, node_port)).unwrap();
    let spawn = |w: &World, i: usize| -> LabProcess {
        w.lab
            .node(i)
            .spawn_speaker(
                std::path::Path::new(env!("CARGO_BIN_EXE_ferrolb")),
                &dir,
                &["--memberlist-secret-file", w.secret.to_str().unwrap()],
            )
            .unwrap()
    };
    for i in 0..3 {
        w.speakers[i] = Some(spawn(&w, i));
    }
    let mut standalone = Vec::new();
    for round in 0..KILLS {
        let owner = eventually(Duration::from_secs(30), "a standalone owner", || async {
            w.connects(vip).then(|| w.owner(vip))
        })
        .await;
        let killed = w.speakers[owner].take().unwrap();
        let node = w.lab.node(owner).clone();
        let outage = measure_tcp_outage(
            w.lab.client(),
            SocketAddr::new(vip, VIP_PORT),
            || {
                node.set_link(false)?;
                killed.kill_hard()
            },
            Duration::from_secs(10),
        )
        .unwrap();
        standalone.push(outage.duration);
        node.set_link(true).unwrap();
        eprintln!(
            "standalone mode, kill {}: outage {}",
            round + 1,
            format_duration(outage.duration)
        );
        w.speakers[owner] = Some(spawn(&w, owner));
        eventually(
            Duration::from_secs(30),
            "the VIP back on its first owner",
            || async { (w.owner(vip) == owner).then_some(()) },
        )
        .await;
    }
    rows.push((
        "failover outage, standalone mode (median / max of 10)".into(),
        bench::spread(&standalone),
    ));

    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!(
        "\nferrolb speaker in a cluster (3 nodes, the owner's link cut and its speaker killed)"
    );
    for (k, v) in rows {
        println!("  {k:width$}  {v}");
    }
}

/// LoadBalancer Services bulk-N for N in `from..to`, without NodePorts.
async fn create(w: &World, from: usize, to: usize) {
    let api: Api<Service> = Api::namespaced(w.cluster.client().await, "default");
    futures::stream::iter(from..to)
        .map(|i| {
            let api = api.clone();
            async move {
                let mut svc = cluster::load_balancer(&format!("bulk-{i}"), &[]);
                svc.spec.as_mut().unwrap().allocate_load_balancer_node_ports = Some(false);
                api.create(&PostParams::default(), &svc).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// Waits until `count` Services carry the announcing node's condition.
async fn wait_reported(w: &World, count: usize) {
    eventually(
        Duration::from_secs(300),
        &format!("{count} Services reported"),
        || async {
            let n = conditions(w).await.len();
            (n >= count).then_some(())
        },
    )
    .await;
}

/// Service name to the node its IPv4 condition names.
async fn conditions(w: &World) -> BTreeMap<String, String> {
    let api: Api<Service> = Api::namespaced(w.cluster.client().await, "default");
    api.list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|s| {
            let c = s
                .status?
                .conditions?
                .into_iter()
                .find(|c| c.type_ == "ferrolb.io/AnnouncedIPv4" && c.status == "True")?;
            let node = c
                .message
                .split(" is announced by ")
                .nth(1)?
                .split(' ')
                .next()?
                .to_string();
            Some((s.metadata.name?, node))
        })
        .collect()
}

async fn owned_by(w: &World, node: usize) -> usize {
    let name = w.lab.node(node).name().to_string();
    conditions(w).await.values().filter(|n| **n == name).count()
}

fn standalone_objects(vip: IpAddr, node_port: u16) -> String {
    format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: lab}}\n\
         spec: {{addresses: [192.0.2.200-192.0.2.209]}}\n---\n\
         apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: lab}}\n\
         spec: {{forwarding: nodePort}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
         spec: {{type: LoadBalancer, ports: [{{port: {VIP_PORT}, nodePort: {node_port}, protocol: TCP}}]}}\n\
         status: {{loadBalancer: {{ingress: [{{ip: \"{vip}\"}}]}}}}\n"
    )
}
