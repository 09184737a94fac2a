//! The controller against a real control plane on this machine: how fast a new Service
//! gets its IP with 1,000 and 10,000 already assigned, how many API requests it makes
//! (from the API server's audit log), its memory, and how long a restart takes to adopt
//! 10,000 assignments. Prints figures; asserts nothing but that the run worked.
//!
//! `cargo bench -p ferrolb --bench controller` (as root only for the lab-less parts:
//! nothing here needs root). `FERROLB_BENCH_SERVICES=N` changes the larger count.

#[path = "../tests/cluster/mod.rs"]
mod cluster;

use std::time::{Duration, Instant};

use cluster::{Cluster, Controller, bench, eventually};
use ferrolb_control_plane::Options;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};

const CONTROLLER_USER: &str = "system:serviceaccount:ferrolb-system:ferrolb-controller";
const SAMPLES: usize = 100;

fn main() {
    bench::main(run);
}

async fn run() {
    let large = bench::large_count();
    let cluster = Cluster::start_with(Options {
        audit: true,
        ..Options::default()
    })
    .await;
    // 198.18.0.0/15 is the benchmarking range: 131,072 addresses, never routed here.
    cluster.apply(&cluster::pool("bench", &["198.18.0.0/15"]));
    for ns in ["bulk", "probe"] {
        cluster.kubectl(&["create", "namespace", ns]);
    }
    let mut controller = cluster.controller("bench", &["--leader-elect=false"]).await;
    controller.wait_ready().await;

    let mut rows: Vec<(String, String)> = Vec::new();
    let mut assigned = 0;
    for target in [1_000, large] {
        let before = bench::requests(&cluster.cp, CONTROLLER_USER);
        let started = Instant::now();
        bulk(&cluster, assigned, target).await;
        let took = started.elapsed();
        let after = bench::requests(&cluster.cp, CONTROLLER_USER);
        let created = target - assigned;
        assigned = target;
        rows.push((
            format!("create {created} Services, until all have IPs"),
            format!(
                "{:.1} s ({:.0}/s)",
                took.as_secs_f64(),
                created as f64 / took.as_secs_f64()
            ),
        ));
        rows.push((
            format!("controller requests per Service allocated (to {target})"),
            per_service(&before, &after, created),
        ));
        let (median, p99) = latency(&cluster).await;
        rows.push((
            format!("creation to status, {target} assigned: median / p99"),
            format!("{median:.1} ms / {p99:.1} ms ({SAMPLES} samples)"),
        ));
    }
    rows.push((
        format!("controller resident memory, {large} Services"),
        format!("{:.1} MiB", bench::rss_mib(controller.pid())),
    ));

    // Let the last pool status flush, then count a quiet minute.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = bench::requests(&cluster.cp, CONTROLLER_USER);
    let rest = Duration::from_secs(60);
    tokio::time::sleep(rest).await;
    let after = bench::requests(&cluster.cp, CONTROLLER_USER);
    rows.push((
        "controller requests per minute at rest".into(),
        bench::describe(&bench::since(&before, &after)),
    ));

    let snapshot = cluster.ips("bulk").await;
    controller.kill();
    let before = bench::requests(&cluster.cp, CONTROLLER_USER);
    let started = Instant::now();
    let restarted: Controller = cluster
        .controller("bench-2", &["--leader-elect=false"])
        .await;
    restarted.wait_ready().await;
    let adopted = started.elapsed();
    // Let it settle, then see that it wrote nothing.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = bench::requests(&cluster.cp, CONTROLLER_USER);
    rows.push((
        format!("restart: start to ready, {large} assignments adopted"),
        format!("{:.2} s", adopted.as_secs_f64()),
    ));
    rows.push((
        "restart: requests in its first 5 s after ready".into(),
        bench::describe(&bench::since(&before, &after)),
    ));
    rows.push((
        format!("controller resident memory after restart, {large} Services"),
        format!("{:.1} MiB", bench::rss_mib(restarted.pid())),
    ));
    let now = cluster.ips("bulk").await;
    let moved = snapshot
        .iter()
        .filter(|(name, ips)| now.get(*name) != Some(ips))
        .count();
    rows.push(("IPs moved by the restart".into(), moved.to_string()));

    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!(
        "\nferrolb controller, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (k, v) in rows {
        println!("  {k:width$}  {v}");
    }
}

/// Creates Services bulk-N for N in `from..to` and waits until all have an IP.
async fn bulk(cluster: &Cluster, from: usize, to: usize) {
    let api: Api<Service> = Api::namespaced(cluster.client().await, "bulk");
    futures::stream::iter(from..to)
        .map(|i| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &service(&format!("bulk-{i}")))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    eventually(
        Duration::from_secs(600),
        "every bulk Service assigned",
        || async {
            let ips = cluster.ips("bulk").await;
            (ips.values().filter(|v| !v.is_empty()).count() == to).then_some(())
        },
    )
    .await;
}

/// A LoadBalancer Service without NodePorts (10,000 Services would exhaust them).
fn service(name: &str) -> Service {
    let mut svc = cluster::load_balancer(name, &[]);
    svc.spec.as_mut().unwrap().allocate_load_balancer_node_ports = Some(false);
    svc
}

/// Creates Services one at a time and times each from the create call to the watch
/// event that shows its IP. Returns (median, p99) in milliseconds.
async fn latency(cluster: &Cluster) -> (f64, f64) {
    let client = cluster.client().await;
    let api: Api<Service> = Api::namespaced(client.clone(), "probe");
    let mut events = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let mut samples = Vec::new();
    static ROUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let round = ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for i in 0..SAMPLES {
        let name = format!("probe-{round}-{i}");
        let started = Instant::now();
        api.create(&PostParams::default(), &service(&name))
            .await
            .unwrap();
        loop {
            let svc = tokio::time::timeout(Duration::from_secs(30), events.next())
                .await
                .expect("a status within 30 s")
                .unwrap()
                .unwrap();
            if svc.metadata.name.as_deref() == Some(name.as_str())
                && !ferrolb_allocator::input::ingress_ips(&svc).is_empty()
            {
                break;
            }
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q| bench::quantile(&samples, q).expect("samples were taken");
    (at(0.5), at(0.99))
}

fn per_service(before: &bench::Requests, after: &bench::Requests, services: usize) -> String {
    let d = bench::since(before, after);
    let writes = bench::writes(&d);
    format!(
        "{:.2} writes ({})",
        writes as f64 / services as f64,
        bench::describe(&d)
    )
}
