//! The speaker's election at cluster sizes the lab cannot reach (issue 24, item 5): how
//! long one speaker takes to work out every IP's owner, which it does after every change
//! it sees (a Service, an endpoint, a node joining or leaving). That time is added to
//! every failover, since a node's death is acted on only once the survivors have
//! recomputed.
//!
//! Pure and in-process: the objects are built in memory (what the watches would hold),
//! membership is a [`ClusterView`] with every node alive and settled, and
//! [`announcements::plan`] runs as the daemon runs it. What is simulated: the API server
//! and the gossip; what is real: every line of the election. One pool, one
//! L2Advertisement for every node (the default, and the worst case: every node is a
//! candidate for every IP), one Service per IP, one in ten of them
//! `externalTrafficPolicy: Local` with three endpoints on nodes spread over the cluster.
//!
//! `cargo bench -p ferrolb --bench election_at_scale`; `FERROLB_BENCH_SIZES=10000x1000,…`
//! (Services x nodes) picks the sizes. Needs nothing but a CPU: no root, no network.
//! Prints figures and asserts nothing but that the run worked.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ferrolb_api::manifests::{Located, Manifests, Origin};
use ferrolb_speaker::announcements::{Addresses, plan};
use ferrolb_speaker::election::{ClusterView, MemberView};
use serde_json::json;

const DEFAULT_SIZES: &str = "1000x3,10000x3,10000x100,10000x1000,100000x1000,100000x5000";

/// A size whose single plan would take longer than this (estimated from the previous
/// size's cost per IP and node) is estimated, not run.
const BUDGET: Duration = Duration::from_secs(120);

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches` and `--list`
    }
    let sizes = std::env::var("FERROLB_BENCH_SIZES").unwrap_or_else(|_| DEFAULT_SIZES.into());
    println!("one speaker's plan (every IP's owner), all nodes candidates for every IP");
    println!("services  nodes   build    plan (median of runs)   per IP   per IP and node");
    let mut cost_per_pair: Option<f64> = None;
    for size in sizes.split(',') {
        let (services, nodes) = size
            .split_once('x')
            .and_then(|(s, n)| Some((s.trim().parse().ok()?, n.trim().parse().ok()?)))
            .unwrap_or_else(|| panic!("FERROLB_BENCH_SIZES: {size:?} is not SERVICESxNODES"));
        let pairs = services as f64 * nodes as f64;
        if let Some(c) = cost_per_pair {
            let estimate = Duration::from_secs_f64(c * pairs);
            if estimate > BUDGET {
                println!(
                    "{services:>8} {nodes:>6}   not run: estimated {:.1} s per plan from the size before",
                    estimate.as_secs_f64()
                );
                continue;
            }
        }
        let start = Instant::now();
        let (m, view) = cluster(services, nodes);
        let built = start.elapsed();
        let addresses = Addresses::FromStatus {
            class: String::new(),
        };
        let me = node_name(0);
        let mut times = Vec::new();
        let started = Instant::now();
        while times.len() < 3 || (started.elapsed() < Duration::from_secs(2) && times.len() < 25) {
            let t = Instant::now();
            let p = plan(&m, &me, &view, &addresses);
            times.push(t.elapsed());
            assert_eq!(p.owners.len(), services, "every IP gets an owner");
            assert!(p.owners.values().all(Option::is_some));
            if times.len() >= 3 && started.elapsed() > BUDGET {
                break;
            }
        }
        times.sort();
        let median = times[times.len() / 2];
        cost_per_pair = Some(median.as_secs_f64() / pairs);
        println!(
            "{services:>8} {nodes:>6} {:>6.2} s {:>12.1} ms ({:>2} runs) {:>7.2} µs {:>10.1} ns",
            built.as_secs_f64(),
            median.as_secs_f64() * 1e3,
            times.len(),
            median.as_secs_f64() * 1e6 / services as f64,
            median.as_secs_f64() * 1e9 / pairs,
        );
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i:05}")
}

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 0)) + i as u32)
}

/// `services` Services with IPs in their status, `nodes` Ready nodes, and a view where
/// every node is alive, settled and on the pool's subnet.
fn cluster(services: usize, nodes: usize) -> (Manifests, ClusterView) {
    fn located<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Located<T> {
        Located {
            origin: Origin::cluster(),
            object: std::sync::Arc::new(serde_json::from_value(v).expect("a valid object")),
        }
    }
    let mut m = Manifests::default();
    m.pools.push(located(json!({
        "apiVersion": "ferrolb.io/v1beta1", "kind": "IPAddressPool",
        "metadata": {"name": "default"},
        "spec": {"addresses": ["10.64.0.0/12"]}
    })));
    m.l2_advertisements.push(located(json!({
        "apiVersion": "ferrolb.io/v1beta1", "kind": "L2Advertisement",
        "metadata": {"name": "all"},
        "spec": {}
    })));
    let mut members = BTreeMap::new();
    for i in 0..nodes {
        let name = node_name(i);
        m.nodes.push(located(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {
                "kubernetes.io/hostname": name,
                "topology.kubernetes.io/zone": format!("zone-{}", i % 3),
            }},
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": format!("10.0.{}.{}", i / 250, i % 250 + 1)}]
            }
        })));
        members.insert(
            name,
            MemberView {
                subnets: vec!["10.0.0.0/8".parse().expect("a subnet")],
                settled: true,
                known: true,
                proxy_failing: false,
            },
        );
    }
    for i in 0..services {
        let name = format!("svc-{i}");
        let local = i % 10 == 0;
        m.services.push(located(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "type": "LoadBalancer",
                "externalTrafficPolicy": if local { "Local" } else { "Cluster" },
                "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30000 + (i % 2000)}]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": IpAddr::V4(ip(i)).to_string()}]}}
        })));
        if local {
            let endpoints: Vec<_> = (0..3)
                .map(|k| {
                    json!({
                        "addresses": [format!("172.16.{}.{}", k, i % 250 + 1)],
                        "conditions": {"ready": true},
                        "nodeName": node_name((i * 7 + k * 131) % nodes),
                    })
                })
                .collect();
            m.endpoint_slices.push(located(json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": format!("{name}-abcde"), "namespace": "default",
                    "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"port": 8080, "protocol": "TCP"}]
            })));
        }
    }
    let view = ClusterView {
        members: Some(members),
    };
    (m, view)
}
