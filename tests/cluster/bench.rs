//! What the benchmarks share: how they run, the API requests a component made (from the
//! control plane's audit log), resident memory and how figures are summarised.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use ferrolb::lab::format_duration;
use ferrolb_control_plane::ControlPlane;

/// Requests by (verb, resource), a subresource written `resource/subresource`.
pub type Requests = BTreeMap<(String, String), usize>;

/// Runs `bench` on a two-thread runtime under `cargo bench`; `cargo test --benches`
/// builds the benchmark without running it.
pub fn main<F: Future<Output = ()>>(bench: impl FnOnce() -> F) {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(bench());
}

/// The larger Service count: `FERROLB_BENCH_SERVICES`, 10,000 by default.
pub fn large_count() -> usize {
    std::env::var("FERROLB_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// The requests `user` made so far, from the audit log (the control plane must have been
/// started with `audit: true`).
pub fn requests(cp: &ControlPlane, user: &str) -> Requests {
    requests_in(&cp.audit_log(), user)
}

/// The requests `user` made so far, from the API server's audit log at `log` (JSON lines).
pub fn requests_in(log: &std::path::Path, user: &str) -> Requests {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts = Requests::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if e["user"]["username"] != user || e["stage"] != "ResponseComplete" {
            continue;
        }
        let mut resource = e["objectRef"]["resource"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(sub) = e["objectRef"]["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        let verb = e["verb"].as_str().unwrap_or_default().to_string();
        *counts.entry((verb, resource)).or_default() += 1;
    }
    counts
}

/// The requests made between two counts.
pub fn since(before: &Requests, after: &Requests) -> Requests {
    after
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(before.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// How many of `counts` are writes.
pub fn writes(counts: &Requests) -> usize {
    counts
        .iter()
        .filter(|((verb, _), _)| matches!(verb.as_str(), "create" | "update" | "patch" | "delete"))
        .map(|(_, n)| n)
        .sum()
}

/// `counts` as "2 patch services/status, 1 create events", or "none".
pub fn describe(counts: &Requests) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|((verb, resource), n)| format!("{n} {verb} {resource}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The resident memory of process `pid` in MiB (0 when it is gone).
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU time (user and system) process `pid` has used so far (zero when it is gone).
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces), from field 3 on.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// "median / max" of `durations`, or "-" when there are none.
pub fn spread(durations: &[Duration]) -> String {
    if durations.is_empty() {
        return "-".into();
    }
    let mut sorted = durations.to_vec();
    sorted.sort();
    format!(
        "{} / {}",
        format_duration(sorted[sorted.len() / 2]),
        format_duration(*sorted.last().unwrap())
    )
}

/// The `q` quantile (0 to 1) of `sorted` samples, nearest rank; `None` when empty.
pub fn quantile(sorted: &[f64], q: f64) -> Option<f64> {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len().max(1));
    sorted.get(rank - 1).copied()
}
