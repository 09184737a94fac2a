//! `ferrolb lab` end to end (the real binary, as a user runs it) and the outage probe it
//! measures failover with.
//!
//! Needs root, iproute2, nftables, arping, ndisc6 and iputils-ping (see `.ci/run`).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferrolb::lab::{
    Lab, NETNS_PREFIX, Outage, PROBE_INTERVAL, PROBE_TIMEOUT, TrafficLost, measure_tcp_outage,
};

/// Generous: a whole `ferrolb lab` run (build, start, answer, failover, teardown).
const RUN_DEADLINE: Duration = Duration::from_secs(60);
const GIVE_UP: Duration = Duration::from_secs(5);

fn lab(nodes: usize) -> Lab {
    if let Err(missing) = Lab::check_prerequisites() {
        panic!("{missing}");
    }
    Lab::new(nodes).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Lab namespaces (`ip netns list`) created by process `pid`.
fn netns_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "ip netns list: {out:?}");
    let prefix = format!("{NETNS_PREFIX}{pid}-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

/// A running `ferrolb lab`, its stdout read line by line on a thread. Dropping it kills
/// the process and removes whatever lab it left (a failing test leaves nothing).
struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Run {
    fn start(args: &[&str]) -> Run {
        if let Err(missing) = Lab::check_prerequisites() {
            panic!("{missing}");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
            .arg("lab")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Run {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads output until a line contains `needle`; that line.
    fn wait_for_line(&mut self, needle: &str) -> String {
        let end = Instant::now() + RUN_DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no line with {needle:?} ({e}); output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to exit; its status and its whole output.
    fn finish(&mut self) -> (std::process::ExitStatus, String) {
        let end = Instant::now() + RUN_DEADLINE;
        // The reader thread ends (closing the channel) when the process closes stdout.
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "ferrolb lab did not finish within {RUN_DEADLINE:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
        let status = self.child.wait().unwrap();
        (status, self.seen.join("\n"))
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args(["-s", signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -s {signal}");
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Its process is gone, so its namespaces are stale now.
        if let Err(e) = Lab::remove_stale() {
            eprintln!("{e:#}");
        }
    }
}

/// The node named in `line` after `marker`, e.g. "answered by " -> "node1".
fn node_after(line: &str, marker: &str) -> String {
    let rest = line
        .split_once(marker)
        .unwrap_or_else(|| panic!("{marker:?} not in {line:?}"))
        .1;
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    assert!(name.starts_with("node"), "{line:?}");
    name
}

/// The milliseconds in "... cut for 212 ms ...".
fn outage_ms(line: &str) -> u64 {
    let rest = line
        .split_once("cut for ")
        .unwrap_or_else(|| panic!("no outage in {line:?}"))
        .1;
    let (number, unit) = rest.split_once(' ').unwrap();
    assert!(unit.starts_with("ms"), "an outage below a second: {line:?}");
    number.parse().unwrap()
}

#[test]
fn ferrolb_lab_shows_the_owner_a_new_owner_and_the_outage_and_leaves_nothing() {
    let mut run = Run::start(&[]);
    let (status, output) = run.finish();
    assert!(status.success(), "{status}:\n{output}");
    println!("{output}");
    let answered = output
        .lines()
        .find(|l| l.contains(" is answered by "))
        .unwrap_or_else(|| panic!("no owner in:\n{output}"));
    let owner = node_after(answered, " is answered by ");
    assert!(
        output.contains(&format!("connected ({owner}'s backend)")),
        "{output}"
    );
    let new = output
        .lines()
        .find(|l| l.contains("new owner: "))
        .unwrap_or_else(|| panic!("no new owner in:\n{output}"));
    let new_owner = node_after(new, "new owner: ");
    assert_ne!(owner, new_owner, "{output}");
    let ms = outage_ms(new);
    println!("failover outage seen by the client: {ms} ms");
    assert!(output.contains("tearing down the lab"), "{output}");
    assert_eq!(netns_of(run.pid()), Vec::<String>::new());
}

#[test]
fn ctrl_c_mid_run_tears_the_lab_down() {
    let mut run = Run::start(&[]);
    run.wait_for_line(" is answered by ");
    assert!(!netns_of(run.pid()).is_empty(), "the lab is up");
    run.signal("INT");
    let (status, output) = run.finish();
    assert_eq!(status.code(), Some(130), "{status:?}:\n{output}");
    assert!(output.contains("tearing down the lab"), "{output}");
    assert_eq!(netns_of(run.pid()), Vec::<String>::new(), "{output}");
    let logs = std::env::temp_dir().join(format!("ferrolb-lab-{}-0", run.pid()));
    assert!(!logs.exists(), "{} is left", logs.display());
}

#[test]
fn keep_leaves_the_lab_up_until_ctrl_c() {
    let mut run = Run::start(&["--keep", "--nodes", "2", "--give-up-ms", "1000"]);
    run.wait_for_line("until Ctrl-C");
    let netns = netns_of(run.pid());
    assert_eq!(netns.len(), 4, "switch, two nodes, client: {netns:?}");
    // The client's namespace as printed, and the lab still carries traffic.
    let line = run.wait_for_line(" arping ");
    let client = line
        .split_whitespace()
        .nth(3)
        .unwrap_or_else(|| panic!("{line:?}"));
    assert!(netns.iter().any(|n| n == client), "{client} in {netns:?}");
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            client,
            "ping",
            "-c",
            "1",
            "-W",
            "1",
            "192.0.2.10",
        ])
        .output()
        .unwrap();
    assert!(ping.status.success(), "{ping:?}");
    run.signal("TERM");
    let (status, output) = run.finish();
    assert_eq!(status.code(), Some(143), "{status:?}:\n{output}");
    assert_eq!(netns_of(run.pid()), Vec::<String>::new(), "{output}");
}

#[test]
fn without_its_tools_it_says_what_is_missing_and_builds_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
        .arg("lab")
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.status.signal().is_none());
    for what in [
        "`ip` (Debian package iproute2)",
        "`nft` (Debian package nftables)",
    ] {
        assert!(stderr.contains(what), "{what} in {stderr}");
    }
    assert!(stderr.contains("apt-get install"), "{stderr}");
}

// The outage probe, on a plain lab: a backend on node0, probed from the client.

fn node0_backend(lab: &Lab) -> (SocketAddr, ferrolb::lab::TcpBackend) {
    let node = lab.node(0);
    let addr = SocketAddr::new(IpAddr::from(node.ipv4()), 30080);
    (addr, node.serve_tcp(addr).unwrap())
}

#[test]
fn no_disruption_is_a_zero_outage() {
    let lab = lab(1);
    let (addr, backend) = node0_backend(&lab);
    let outage = measure_tcp_outage(lab.client(), addr, || Ok(()), GIVE_UP).unwrap();
    assert_eq!(outage.duration, Duration::ZERO, "{outage:?}");
    assert_eq!(outage.failed_probes, 0, "{outage:?}");
    assert!(outage.probes > 0, "{outage:?}");
    assert!(backend.accepted() > 0);
}

#[test]
fn a_backend_down_for_300_ms_is_a_300_ms_outage() {
    let lab = lab(1);
    let node = lab.node(0);
    let (addr, backend) = node0_backend(&lab);
    let mut backend = Some(backend);
    let cut = Duration::from_millis(300);
    let mut down = Duration::ZERO;
    let outage: Outage = measure_tcp_outage(
        lab.client(),
        addr,
        || {
            let start = Instant::now();
            backend.take();
            // The disruption itself, not a synchronisation: the backend stays down this long.
            std::thread::sleep(cut);
            backend = Some(node.serve_tcp(addr)?);
            down = start.elapsed();
            Ok(())
        },
        GIVE_UP,
    )
    .unwrap();
    println!("backend down for {down:?}: outage {outage:?}");
    assert!(outage.failed_probes > 0, "{outage:?}");
    assert!(outage.duration >= cut, "{outage:?}");
    // Refused connections fail at once: at most a probe interval more than the cut.
    let slack = PROBE_INTERVAL + Duration::from_millis(50);
    assert!(outage.duration <= down + slack, "{outage:?}, down {down:?}");
}

#[test]
fn pulling_the_cable_for_300_ms_cuts_traffic_at_least_that_long() {
    let lab = lab(1);
    let (addr, _backend) = node0_backend(&lab);
    let node = lab.node(0);
    let cut = Duration::from_millis(300);
    // From before the cable is pulled to after it is back (`ip` takes a while too).
    let mut down = Duration::ZERO;
    let outage: Outage = measure_tcp_outage(
        lab.client(),
        addr,
        || {
            let start = Instant::now();
            node.set_link(false)?;
            // The disruption itself, not a synchronisation: the cable stays out this long.
            std::thread::sleep(cut);
            node.set_link(true)?;
            down = start.elapsed();
            Ok(())
        },
        GIVE_UP,
    )
    .unwrap();
    println!("cable out for {down:?}: outage {outage:?}");
    assert!(outage.failed_probes > 0, "{outage:?}");
    assert!(outage.duration >= cut, "{outage:?}");
    // Losing carrier flushes the node's neighbour entries; when the backend closes a
    // connection meanwhile, the node starts resolving the client, and its SYN-ACKs wait
    // for the next ARP retransmission (1 s) after the cable is back. That is the
    // kernel's behaviour, measured as it is: allow it, plus a probe's timeout.
    let slack = Duration::from_secs(1) + PROBE_INTERVAL + PROBE_TIMEOUT + Duration::from_millis(50);
    assert!(outage.duration <= down + slack, "{outage:?}, down {down:?}");
}

#[test]
fn traffic_that_never_returns_gives_up_with_traffic_lost() {
    let lab = lab(1);
    let (addr, backend) = node0_backend(&lab);
    let mut backend = Some(backend);
    let give_up = Duration::from_millis(300);
    let err = measure_tcp_outage(
        lab.client(),
        addr,
        || {
            backend.take();
            Ok(())
        },
        give_up,
    )
    .unwrap_err();
    let lost = err
        .downcast_ref::<TrafficLost>()
        .unwrap_or_else(|| panic!("{err:#}"));
    assert_eq!(lost.target, addr);
    assert_eq!(lost.after, give_up);
    assert!(
        lost.failed_probes > 0 && lost.failed_probes == lost.probes,
        "{lost:?}"
    );
    assert!(
        err.to_string().contains("did not come back within 300 ms"),
        "{err}"
    );
}

#[test]
fn an_unreachable_target_is_an_error_before_any_disruption() {
    let lab = lab(1);
    // Nothing listens: every probe is refused.
    let addr = SocketAddr::new(IpAddr::from(lab.node(0).ipv4()), 30081);
    let mut disrupted = false;
    let err = measure_tcp_outage(
        lab.client(),
        addr,
        || {
            disrupted = true;
            Ok(())
        },
        // Long enough for the first SYN of a fresh lab to be answered on a loaded
        // machine, so the error is the refusal rather than a timeout.
        Duration::from_secs(2),
    )
    .unwrap_err();
    assert!(!disrupted, "the disruption must not run");
    assert!(err.to_string().contains("cannot reach"), "{err:#}");
    assert!(format!("{err:#}").contains("refused"), "{err:#}");
}
