//! False failovers with the machine at 100 % CPU (issue 24, item 2): membership settings
//! that detect a dead node sooner must not declare a live one dead because it was slow.
//!
//! For each membership setting (`FERROLB_BENCH_SETTINGS`, comma-separated
//! `period/rtt/suspect` in ms; default: the defaults before and since issue 24 and the
//! documented tuned profile): a fresh 3-node lab, the real `ferrolb speaker` on every node in standalone
//! mode owning [`SERVICES`] VIPs, settled (every speaker reports 3 members and settled).
//! Then the bench starts busy threads, two per CPU, at the speakers' own priority, for
//! [`LOAD_TIME`] (`FERROLB_BENCH_LOAD_SECONDS`), and counts from every speaker's
//! metrics what a user would see: members declared down, times a speaker was declared
//! down by its peers, and IPs that changed owner. Any of those is a false failover: no
//! node died.
//!
//! Prints figures and asserts nothing. Runs only under `cargo bench` (which passes
//! `--bench`); `cargo test --benches` and `--list` return at once. Needs root and
//! iproute2.

#[path = "support/membership_settings.rs"]
mod membership_settings;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrolb::lab::{Host, Lab, LabProcess, poll_until};

const NODES: usize = 3;
const SERVICES: usize = 30;
const LOAD_TIME: Duration = Duration::from_secs(60);
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
const METRICS_PORT: u16 = 7474;

/// The counters that move on a (false) failover, as the speakers name them.
const COUNTERS: [&str; 3] = [
    "ferrolb_speaker_members_declared_down_total",
    "ferrolb_speaker_membership_declared_down_by_peers_total",
    "ferrolb_speaker_ownership_changes_total",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    if flag("--list") {
        return ExitCode::SUCCESS;
    }
    if !flag("--bench") || flag("--test") {
        eprintln!(
            "membership_under_load: skipped (it runs under `cargo bench`, which passes --bench)"
        );
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("membership_under_load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The settings to measure: `FERROLB_BENCH_SETTINGS`, else the old and the new defaults
/// and the tuned profile.
fn settings() -> Result<Vec<(u64, u64, u64)>> {
    let text = std::env::var("FERROLB_BENCH_SETTINGS")
        .unwrap_or_else(|_| "50/20/100,40/15/80,25/10/50".into());
    membership_settings::parse("FERROLB_BENCH_SETTINGS", &text)
}

fn run() -> Result<()> {
    let load_time = match std::env::var("FERROLB_BENCH_LOAD_SECONDS") {
        Ok(s) => Duration::from_secs(s.parse().context("FERROLB_BENCH_LOAD_SECONDS")?),
        Err(_) => LOAD_TIME,
    };
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut lines = Vec::new();
    for (period, rtt, suspect) in settings()? {
        let counted = one(period, rtt, suspect, load_time, cpus)?;
        lines.push(format!(
            "membership {period}/{rtt}/{suspect} ms: {} busy threads on {cpus} CPUs for {} s: \
             members declared down {}, speakers declared down by peers {}, IPs that changed \
             owner {} (of {SERVICES}; every one a false failover)",
            2 * cpus,
            load_time.as_secs(),
            counted[0],
            counted[1],
            counted[2]
        ));
    }
    println!();
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// One lab with these settings under load: the three counters' growth, summed over nodes.
fn one(period: u64, rtt: u64, suspect: u64, load_time: Duration, cpus: usize) -> Result<[f64; 3]> {
    let lab = Lab::new(NODES)?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("nodes.yaml"), lab.node_manifests())?;
    std::fs::write(dir.path().join("pool.yaml"), POOL)?;
    std::fs::write(dir.path().join("services.yaml"), services())?;
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_ferrolb"));
    let speakers: Vec<LabProcess> = lab
        .nodes()
        .iter()
        .map(|node| {
            let args = [
                "--metrics-address".to_string(),
                format!("127.0.0.1:{METRICS_PORT}"),
                "--member-probe-period-ms".to_string(),
                period.to_string(),
                "--member-probe-rtt-ms".to_string(),
                rtt.to_string(),
                "--member-suspect-ms".to_string(),
                suspect.to_string(),
            ];
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            node.spawn_speaker(&binary, dir.path(), &args)
        })
        .collect::<Result<_>>()?;
    let settled = poll_until(
        SETTLE_DEADLINE,
        "every speaker settled with 3 members",
        || {
            lab.nodes()
                .iter()
                .all(|n| {
                    metric(n, "ferrolb_speaker_members") == Some(NODES as f64)
                        && metric(n, "ferrolb_speaker_membership_settled") == Some(1.0)
                })
                .then_some(())
        },
    );
    if let Err(e) = settled {
        let logs: String = speakers
            .iter()
            .map(|s| s.stderr().unwrap_or_default())
            .collect();
        bail!("{e:#}\n{logs}");
    }
    let before = totals(&lab)?;
    eprintln!(
        "membership_under_load: {period}/{rtt}/{suspect} ms settled; {} busy threads for {} s",
        2 * cpus,
        load_time.as_secs()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let busy: Vec<_> = (0..2 * cpus)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x: u64 = 1;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..10_000 {
                        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                    }
                    std::hint::black_box(x);
                }
            })
        })
        .collect();
    let start = Instant::now();
    while start.elapsed() < load_time {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    for b in busy {
        let _ = b.join();
    }
    let after = totals(&lab)?;
    drop(speakers);
    lab.close()?;
    Ok([0, 1, 2].map(|i| after[i] - before[i]))
}

fn totals(lab: &Lab) -> Result<[f64; 3]> {
    let mut sums = [0.0; 3];
    for node in lab.nodes() {
        for (i, name) in COUNTERS.iter().enumerate() {
            sums[i] +=
                metric(node, name).with_context(|| format!("{} serves no {name}", node.name()))?;
        }
    }
    Ok(sums)
}

/// `series` on the metrics endpoint of the speaker in `node`.
fn metric(node: &Host, series: &str) -> Option<f64> {
    let page = node
        .in_netns(|| {
            let mut conn = TcpStream::connect(("127.0.0.1", METRICS_PORT)).ok()?;
            conn.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
            let mut page = String::new();
            conn.read_to_string(&mut page).ok()?;
            Some(page)
        })
        .ok()??;
    page.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

const POOL: &str = "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: bench}\n\
spec:\n  addresses: [192.0.2.130-192.0.2.249]\n---\n\
apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: bench}\nspec: {}\n";

fn services() -> String {
    (0..SERVICES)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}, namespace: default}}\n\
                 spec:\n  type: LoadBalancer\n  ports:\n  - {{port: 80, nodePort: {}, protocol: TCP}}\n",
                30000 + i
            )
        })
        .collect()
}
