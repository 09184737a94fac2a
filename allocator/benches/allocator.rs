//! Allocator speed: prints figures, asserts nothing.
//!
//! `cargo bench -p ferrolb-allocator --bench allocator`
//!
//! For an IPv4 /16 and an IPv6 /64 pool, the same workload:
//! * 10,000 Services allocated from empty, in one `plan` with the hashed start (what
//!   standalone speakers run) and one by one through `Allocator::assign` with the lowest
//!   free start (what the controller runs);
//! * with 100,000 Services already allocated, per-allocation median and p99 of 2,000
//!   more, after churn released 2,000 of the 100,000 so the free space has holes.
//!
//! A /16 holds 65,536 addresses, fewer than 100,000 Services, so in both pools the
//! Services come in pairs sharing one IP (same allow-shared-ip key, ports 80 and 443):
//! 100,000 Services on 50,000 IPs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferrolb_allocator::{
    Allocator, Outcome, PoolConfig, PortKey, ServiceKey, ServiceRequest, Start, plan,
};
use ferrolb_api::Family;
use ferrolb_api::address::parse_range;

fn pool(cidr: &str) -> PoolConfig {
    PoolConfig {
        name: "bench".into(),
        ranges: vec![parse_range(cidr).unwrap()],
        usable: true,
        auto_assign: true,
        // The sharing pairs are in different namespaces.
        share_across_namespaces: true,
        ..Default::default()
    }
}

/// Service `i`: pairs (2k, 2k+1) share key k on ports 80 and 443.
fn service(i: usize, family: Family) -> ServiceRequest {
    ServiceRequest {
        key: ServiceKey::new(format!("ns{}", i % 100), format!("svc{i:07}")),
        ports: vec![PortKey {
            port: if i.is_multiple_of(2) { 80 } else { 443 },
            protocol: "TCP".into(),
        }],
        sharing_key: Some(format!("pair{}", i / 2)),
        families: vec![family],
        ..Default::default()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn run(label: &str, cidr: &str, family: Family) {
    // 10,000 from empty.
    let services: Vec<ServiceRequest> = (0..10_000).map(|i| service(i, family)).collect();
    let start = Instant::now();
    let p = plan(vec![pool(cidr)], BTreeMap::new(), &services, Start::Hashed);
    let batch = start.elapsed();
    assert!(
        p.services
            .values()
            .all(|o| matches!(o, Outcome::Assigned { .. }))
    );

    let mut a = Allocator::new(vec![pool(cidr)], BTreeMap::new(), Start::Lowest);
    let start = Instant::now();
    for s in &services {
        a.assign(s);
    }
    let one_by_one = start.elapsed();

    // 100,000 allocated, churn, then timed allocations.
    let mut a = Allocator::new(vec![pool(cidr)], BTreeMap::new(), Start::Lowest);
    for i in 0..100_000 {
        a.assign(&service(i, family));
    }
    for i in (0..100_000).step_by(50) {
        a.release(&service(i, family).key);
        a.release(&service(i + 1, family).key);
    }
    let mut times = Vec::with_capacity(2_000);
    for i in 100_000..102_000 {
        let s = service(i, family);
        let start = Instant::now();
        let outcome = a.assign(&s);
        times.push(start.elapsed());
        assert!(matches!(outcome, Outcome::Assigned { .. }));
    }
    times.sort();
    println!(
        "{label:<10} 10k from empty: plan {:>7.2} ms, assign one by one {:>7.2} ms | \
         with 100k allocated: median {:>6.2} µs, p99 {:>6.2} µs, max {:>7.2} µs",
        batch.as_secs_f64() * 1e3,
        one_by_one.as_secs_f64() * 1e3,
        percentile(&times, 0.5).as_secs_f64() * 1e6,
        percentile(&times, 0.99).as_secs_f64() * 1e6,
        times.last().unwrap().as_secs_f64() * 1e6,
    );
}

fn main() {
    // `cargo test --benches` runs this too; keep that quick.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    run("IPv4 /16", "10.0.0.0/16", Family::V4);
    run("IPv6 /64", "fd00::/64", Family::V6);
}
