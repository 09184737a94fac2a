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
use k8s_openapi::api::core::v1::Service;
use kube::Api;

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
    // The benchmarking range is on the lab's segment, as a pool's addresses are on a real
    // one: without a route for it the speakers announce its IPs nowhere (and say so),
    // and no Service of the bulk is ever reported.
    for node in w.lab.nodes() {
        node.run(
            "ip",
            ["route", "add", "198.18.0.0/15", "dev", node.ifname()],
        )
        .unwrap();
    }
    w.cluster.apply(&cluster::pool(
        "bulk",
        // 198.18.0.0/15, the benchmarking range: room for any FERROLB_BENCH_SERVICES.
        &["192.0.2.128-192.0.2.199", "198.18.0.0/15"],
    ));
    w.create_bulk(1, 100, &[]).await;
    wait_reported(&w, 100).await;
    let mut rows: Vec<(String, String)> = Vec::new();
    // FERROLB_BENCH_ONLY=scale measures only the speakers under many Services.
    let only_scale = std::env::var("FERROLB_BENCH_ONLY").is_ok_and(|v| v == "scale");
    if !only_scale {
        failovers(&mut w, vip, &mut rows).await;
    }

    w.create_bulk(100, 1000, &[]).await;
    wait_reported(&w, 1000).await;
    rows.push(("speaker resident memory, 1,000 Services".into(), rss(&w)));
    scale(&w, &mut rows).await;

    if !only_scale {
        standalone(&mut w, vip, node_port, &mut rows).await;
    }

    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!(
        "\nferrolb speaker in a cluster (3 nodes, the owner's link cut and its speaker killed)"
    );
    for (k, v) in rows {
        println!("  {k:width$}  {v}");
    }
}

/// Requests at rest, then the owner killed 10 times in cluster mode.
async fn failovers(w: &mut World, vip: IpAddr, rows: &mut Vec<(String, String)>) {
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
        let owned = owned_by(w, owner).await;
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
            || async { (owned_by(w, owner).await == 0).then_some(()) },
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
}

/// The same owner kills with the speakers reading files.
async fn standalone(w: &mut World, vip: IpAddr, node_port: u16, rows: &mut Vec<(String, String)>) {
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
        w.speakers[i] = Some(spawn(w, i));
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
        w.speakers[owner] = Some(spawn(w, owner));
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
}

fn rss(w: &World) -> String {
    w.speakers
        .iter()
        .flatten()
        .map(|s| format!("{:.1} MiB", bench::rss_mib(s.pid())))
        .collect::<Vec<_>>()
        .join(", ")
}

/// From 1,000 Services to `FERROLB_BENCH_SERVICES` (10,000): how long until every new
/// Service is announced and reported, what it cost the speakers in CPU, API writes and
/// memory, and whether membership held (a busy speaker taken for a dead one moves IPs).
async fn scale(w: &World, rows: &mut Vec<(String, String)>) {
    let total = bench::large_count();
    if total <= 1000 {
        return;
    }
    let pids: Vec<u32> = w.speakers.iter().flatten().map(LabProcess::pid).collect();
    let cpu_before: Vec<Duration> = pids.iter().map(|p| bench::cpu_time(*p)).collect();
    let changes_before = membership_changes(w);
    let requests_before = bench::requests(&w.cluster.cp, SPEAKER_USER);
    let start = std::time::Instant::now();
    w.create_bulk(1000, total, &[]).await;
    let created = start.elapsed();
    wait_reported(w, total).await;
    let reported = start.elapsed();
    let writes = bench::writes(&bench::since(
        &requests_before,
        &bench::requests(&w.cluster.cp, SPEAKER_USER),
    ));
    let cpu: Vec<String> = pids
        .iter()
        .zip(&cpu_before)
        .map(|(p, before)| format!("{:.1} s", (bench::cpu_time(*p) - *before).as_secs_f64()))
        .collect();
    let added = total - 1000;
    rows.push((
        format!("{added} more Services: all reported after"),
        format!(
            "{} (created by then: {})",
            format_duration(reported),
            format_duration(created)
        ),
    ));
    rows.push(("  speaker CPU time meanwhile".into(), cpu.join(", ")));
    rows.push((
        "  speaker writes per Service".into(),
        format!("{:.2}", writes as f64 / added as f64),
    ));
    rows.push((
        "  membership changes seen meanwhile (0: no false suspicion)".into(),
        (membership_changes(w) - changes_before).to_string(),
    ));
    rows.push((format!("speaker resident memory, {total} Services"), rss(w)));
}

/// How many times the speakers logged a change in the members that may own IPs, or
/// that their peers had declared them down (a node declared down and back within one
/// planning pass leaves no change in the others' logs, only in its own).
fn membership_changes(w: &World) -> usize {
    let logs = w.logs();
    logs.matches("members that may own IPs changed").count()
        + logs.matches("declared down by peers").count()
}

/// Waits until `count` Services carry the announcing node's condition (listing them once
/// a second: listing 10,000 Services more often would load the API server the speakers
/// are measured against).
async fn wait_reported(w: &World, count: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    loop {
        let n = conditions(w).await.len();
        if n >= count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {n} of {count} Services reported after 900 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
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
