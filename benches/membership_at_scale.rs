//! Membership at cluster sizes the lab cannot reach (issue 24): thousands of foca
//! instances with ferrolb's default settings, in one process, on a simulated network and
//! clock ([`ferrolb_speaker::membership::simulation`] says what is real and what is not).
//! For each size, a few rounds of: the cluster runs steady for a few seconds, then one
//! member stops at once; the figures are how long the survivors take to declare it down
//! (the first, the median and the last of them: the last is when every node agrees, so
//! when its IPs have moved everywhere) and what membership costs each node in the steady
//! state.
//!
//! `cargo bench -p ferrolb --bench membership_at_scale`; `FERROLB_BENCH_MEMBERS=3,50,…`
//! picks the sizes, `FERROLB_BENCH_ROUNDS` the rounds (seeds) per size. No root, no
//! network. Prints figures and asserts nothing but that the run worked.

use std::time::{Duration, Instant};

use ferrolb_speaker::membership::Settings;
use ferrolb_speaker::membership::simulation::node_loss;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --benches` and `--list`
    }
    let sizes =
        std::env::var("FERROLB_BENCH_MEMBERS").unwrap_or_else(|_| "3,50,200,500,1000".into());
    let rounds: u64 = std::env::var("FERROLB_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let mut settings = Settings::default();
    if let Some(tx) = std::env::var("FERROLB_BENCH_MAX_TX")
        .ok()
        .and_then(|t| t.parse().ok())
    {
        settings.max_transmissions = tx;
    }
    println!(
        "membership (probe every {:?}, rtt {:?}, suspect to down {:?}, each update passed on tx = max({}, 6·log10(n+1)) times); one member lost per round",
        settings.probe_period,
        settings.probe_rtt,
        settings.suspect_to_down,
        settings.max_transmissions
    );
    println!(
        "members   tx rounds  declared down by survivors: first / median / last (median of rounds; worst last)  false downs  per node: datagrams/s  bytes/s   wall"
    );
    for size in sizes.split(',') {
        let members: usize = size
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("FERROLB_BENCH_MEMBERS: {size:?}"));
        let started = Instant::now();
        let mut first = Vec::new();
        let mut median = Vec::new();
        let mut last = Vec::new();
        let (mut false_downs, mut datagrams, mut bytes, mut unconverged) = (0, 0.0, 0.0, 0);
        for seed in 1..=rounds {
            let loss = node_loss(
                members,
                &settings,
                Duration::from_secs(3),
                Duration::from_secs(30),
                seed,
            )
            .expect("the simulation runs");
            first.push(loss.quantile(0.0).unwrap_or(Duration::MAX));
            median.push(loss.quantile(0.5).unwrap_or(Duration::MAX));
            match loss.converged_after() {
                Some(t) => last.push(t),
                None => unconverged += 1,
            }
            false_downs += loss.false_downs;
            datagrams += loss.datagrams_per_node_per_s / rounds as f64;
            bytes += loss.bytes_per_node_per_s / rounds as f64;
        }
        let mid = |v: &mut Vec<Duration>| {
            v.sort();
            v.get(v.len() / 2)
                .map_or("-".to_string(), |d| format!("{} ms", d.as_millis()))
        };
        let unconverged = if unconverged > 0 {
            format!(" ({unconverged} rounds never agreed within 30 s)")
        } else {
            String::new()
        };
        println!(
            "{members:>7} {:>4} {rounds:>6}  {:>8} / {:>8} / {:>8} ({:>8}){unconverged} {:>12} {:>22.1} {:>8.0} {:>6.1} s",
            settings.transmissions_for(members),
            mid(&mut first),
            mid(&mut median),
            mid(&mut last),
            last.last()
                .map_or("-".to_string(), |d| format!("{} ms", d.as_millis())),
            false_downs,
            datagrams,
            bytes,
            started.elapsed().as_secs_f64()
        );
    }
}
