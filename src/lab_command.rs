//! `ferrolb lab`: failover shown on real kernels in a few seconds, with no cluster.
//!
//! Builds a network-namespace lab (a switch, N nodes, a client), writes a manifest
//! directory (the Nodes, a pool, an L2Advertisement with NodePort forwarding, Service
//! `demo/web`), runs the real `ferrolb speaker` on every node, and a TCP backend on every
//! node's NodePort. It finds the node that answers ARP for the Service's IPv4 address
//! from the client, connects through it, then takes that node down and measures, from the
//! client, how long new connections failed until another node served them.
//!
//! Taking the node down means SIGKILL to its speaker *and* stopping its backend. Killing
//! the speaker alone cuts nothing a client would see: its ARP cache still points at the
//! node, whose kernel keeps DNATing to a backend that still runs, so traffic flows until
//! the new owner's gratuitous ARP moves it. With the backend gone too, the figure is the
//! time clients of a crashed node wait for failover.
//!
//! Exit codes: 0 failover measured; 1 the demonstration failed (e.g. traffic never came
//! back); 2 the lab cannot run here (what is missing is printed); 128+N after signal N
//! (Ctrl-C: 130). The lab is torn down in every case; `--keep` holds it up until Ctrl-C.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use ferrolb_allocator::input;
use ferrolb_allocator::{self as allocator, ServiceKey};
use ferrolb_api::manifests::Manifests;

use crate::lab::{
    self, IPV4_PREFIX_LEN, IPV4_SUBNET, IPV6_PREFIX_LEN, IPV6_SUBNET, Lab, LabProcess, TcpBackend,
    TrafficLost, format_duration, format_mac, measure_tcp_outage_unless,
};

/// What `ferrolb lab --help` says the lab needs (what [`Lab::check_prerequisites`]
/// checks), so nobody learns it from a failed run.
const PREREQUISITES: &str = "Needs root, and these programs: ip (package iproute2), nft \
    (nftables), arping (arping, Thomas Habets' version), ndisc6 (ndisc6) and ping \
    (iputils-ping). On Debian or Ubuntu: apt-get install iproute2 nftables arping ndisc6 \
    iputils-ping";

/// The demo Service: `demo/web`, port 80, NodePort 30080.
const NAMESPACE: &str = "demo";
const SERVICE: &str = "web";
const PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
const POOL_V4: &str = "192.0.2.200-192.0.2.250";
const POOL_V6: &str = "2001:db8::200-2001:db8::250";
/// How long the speakers may take to answer for the VIP after they start.
const ANSWER_DEADLINE: Duration = Duration::from_secs(10);
/// How long the proof connection through the VIP may take.
const CONNECT_DEADLINE: Duration = Duration::from_secs(2);
/// Lines of each speaker's log printed when the demonstration fails.
const LOG_TAIL: usize = 8;

/// Build a lab of network namespaces, run the speaker on every node, kill the VIP's
/// owner and measure the failover from a client (as root).
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = PREREQUISITES)]
pub struct LabArgs {
    /// Leave the lab up afterwards for poking around (prints how), until Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=lab::MAX_NODES as i64))]
    pub nodes: u8,
    /// Milliseconds to wait for the client's traffic to come back before giving up.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    pub give_up_ms: u64,
    /// The ferrolb binary the nodes run as speaker (default: this one).
    #[arg(long, hide = true, value_name = "PATH")]
    pub speaker_binary: Option<PathBuf>,
}

/// Runs `ferrolb lab`; see the [module docs](self) for what it does and its exit codes.
pub fn run(args: LabArgs) -> Result<ExitCode> {
    if let Err(missing) = Lab::check_prerequisites() {
        eprintln!("ferrolb lab: {missing}");
        return Ok(ExitCode::from(2));
    }
    let binary = match &args.speaker_binary {
        Some(path) => path.clone(),
        None => std::env::current_exe().context("finding the ferrolb binary to run")?,
    };
    let signals = Signals::install()?;
    println!(
        "ferrolb lab: {} nodes and a client on a bridge, {IPV4_SUBNET}/{IPV4_PREFIX_LEN} and \
         {IPV6_SUBNET}/{IPV6_PREFIX_LEN}",
        args.nodes
    );
    let lab = match Lab::new(usize::from(args.nodes)) {
        Ok(lab) => lab,
        Err(_) if signals.received().is_some() => return Ok(signals.exit_code()),
        Err(e) => return Err(e),
    };

    let mut demo = Demo {
        lab: &lab,
        signals: &signals,
        speakers: Vec::new(),
        backends: Vec::new(),
        vip: None,
        owner: None,
    };
    let outcome = demo.run(&binary, Duration::from_millis(args.give_up_ms));
    let mut code = match outcome {
        _ if signals.received().is_some() => {
            println!("  interrupted ({})", signals.name());
            signals.exit_code()
        }
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<TrafficLost>() {
                Some(lost) => println!(
                    "  traffic did not come back within {}: no other node took over {}",
                    format_duration(lost.after),
                    lost.target.ip()
                ),
                None => println!("  failed: {e:#}"),
            }
            // With --keep the logs stay on disk, and where is printed below.
            if !args.keep {
                demo.print_log_tails();
            }
            ExitCode::from(1)
        }
    };
    if args.keep && signals.received().is_none() {
        demo.keep();
        code = signals.exit_code_or(code);
    }
    println!("  tearing down the lab");
    drop(demo);
    lab.close()?;
    Ok(code)
}

/// The running demonstration: what it started in the lab, stopped before the lab goes.
struct Demo<'a> {
    lab: &'a Lab,
    signals: &'a Signals,
    /// Node i's speaker at index i.
    speakers: Vec<LabProcess>,
    /// Node i's backends (IPv4 and IPv6 NodePort) at index i; emptied when it goes down.
    backends: Vec<Vec<TcpBackend>>,
    /// The Service's IPv4 address, once computed.
    vip: Option<Ipv4Addr>,
    /// The node the client last reached the VIP through.
    owner: Option<usize>,
}

impl Demo<'_> {
    fn run(&mut self, binary: &Path, give_up: Duration) -> Result<()> {
        let lab = self.lab;
        let client = lab.client();
        let dir = lab.log_dir().join("manifests");
        let files = manifest_files(lab.node_manifests());
        write_manifests(&dir, &files)?;
        let (vip, vip6) = service_ips(&files)?;
        self.vip = Some(vip);
        let vip6 = vip6.map_or_else(String::new, |ip| format!(" and [{ip}]:{PORT}"));
        println!(
            "  pool {POOL_V4}, Service {NAMESPACE}/{SERVICE} -> {vip}:{PORT}{vip6} (NodePort {NODE_PORT})"
        );

        for node in lab.nodes() {
            let addrs = [IpAddr::from(node.ipv4()), IpAddr::from(node.ipv6())];
            let backends = addrs
                .into_iter()
                .map(|ip| node.serve_tcp(SocketAddr::new(ip, NODE_PORT)))
                .collect::<Result<Vec<_>>>()?;
            self.backends.push(backends);
        }
        for node in lab.nodes() {
            self.speakers.push(node.spawn_speaker(binary, &dir, &[])?);
        }

        let owner = self.wait_for_answer(vip)?;
        self.owner = Some(owner);
        let owner_host = lab.node(owner);
        println!(
            "  {vip} is answered by {} ({})",
            owner_host.name(),
            owner_host.mac_string()
        );

        let target = SocketAddr::new(vip.into(), PORT);
        let served = self.connect_once(target)?;
        let via = match served {
            Some(i) if i == owner => format!("{}'s backend", lab.node(i).name()),
            Some(i) => bail!(
                "{vip} is answered by {} but {}'s backend served the connection",
                owner_host.name(),
                lab.node(i).name()
            ),
            None => bail!("the connection through {vip} reached no backend"),
        };
        println!("  client -> {target}: connected ({via})");

        println!(
            "  killing the speaker on {} (SIGKILL) and stopping its backend…",
            owner_host.name()
        );
        let before = self.accepted();
        let (speakers, backends, signals) = (&self.speakers, &mut self.backends, self.signals);
        let outage = measure_tcp_outage_unless(
            client,
            target,
            || {
                speakers[owner].kill_hard()?;
                backends[owner].clear();
                Ok(())
            },
            give_up,
            || signals.received().is_some(),
        )?;
        let new_owner = match client.neighbour(vip)? {
            Some(mac) => self.node_with_mac(mac)?,
            None => bail!("the client has no neighbour entry for {vip} after reaching it"),
        };
        // The probe that succeeded is proof once the new owner's backend accepted it.
        let served = self.wait_until(CONNECT_DEADLINE, || {
            self.accepted()[new_owner] > before[new_owner]
        })?;
        if new_owner == owner || !served {
            bail!(
                "traffic came back, but not through a new owner (the client sends {vip} to {}, \
                 backends accepted {before:?} before and {:?} after)",
                lab.node(new_owner).name(),
                self.accepted()
            );
        }
        self.owner = Some(new_owner);
        let new_host = lab.node(new_owner);
        println!(
            "  new owner: {} ({}) — client traffic was cut for {} ({} of {} probes failed)",
            new_host.name(),
            new_host.mac_string(),
            format_duration(outage.duration),
            outage.failed_probes,
            outage.probes
        );
        Ok(())
    }

    /// Waits until exactly one lab node answers ARP for `vip` from the client; its index.
    fn wait_for_answer(&mut self, vip: Ipv4Addr) -> Result<usize> {
        let client = self.lab.client();
        let start = Instant::now();
        loop {
            self.signals.check()?;
            self.check_speakers()?;
            let macs = client.arping(vip);
            match macs.as_slice() {
                [] => {}
                [mac] => return self.node_with_mac(*mac),
                many => {
                    let names: Vec<String> = many
                        .iter()
                        .map(|m| {
                            self.node_with_mac(*m)
                                .map(|i| self.lab.node(i).name().to_string())
                                .unwrap_or_else(|_| format_mac(m))
                        })
                        .collect();
                    bail!("{vip} is answered by several hosts: {}", names.join(", "));
                }
            }
            if start.elapsed() >= ANSWER_DEADLINE {
                bail!(
                    "no node answered ARP for {vip} within {}",
                    format_duration(ANSWER_DEADLINE)
                );
            }
        }
    }

    /// One TCP connection from the client to `target`; the node whose backend accepted it.
    fn connect_once(&self, target: SocketAddr) -> Result<Option<usize>> {
        let before = self.accepted();
        self.lab
            .client()
            .in_netns(|| TcpStream::connect_timeout(&target, CONNECT_DEADLINE))?
            .with_context(|| format!("the client cannot connect to {target}"))?;
        // The handshake completes in the kernel; the backend's accept() follows shortly.
        let mut served = None;
        self.wait_until(CONNECT_DEADLINE, || {
            let after = self.accepted();
            served = (0..after.len()).find(|&i| after[i] > before[i]);
            served.is_some()
        })?;
        Ok(served)
    }

    /// Polls `done` until it holds (true) or `deadline` passes (false); stops at a signal.
    fn wait_until(&self, deadline: Duration, mut done: impl FnMut() -> bool) -> Result<bool> {
        let start = Instant::now();
        loop {
            if done() {
                return Ok(true);
            }
            if start.elapsed() >= deadline {
                return Ok(false);
            }
            self.signals.check()?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Connections each node's backends accepted so far.
    fn accepted(&self) -> Vec<u64> {
        self.backends
            .iter()
            .map(|b| b.iter().map(TcpBackend::accepted).sum())
            .collect()
    }

    fn node_with_mac(&self, mac: [u8; 6]) -> Result<usize> {
        self.lab
            .node_with_mac(mac)
            .ok_or_else(|| anyhow!("{} is not the MAC of any lab node", format_mac(&mac)))
    }

    /// Fails, with its log, when a speaker has exited on its own.
    fn check_speakers(&mut self) -> Result<()> {
        for (i, speaker) in self.speakers.iter_mut().enumerate() {
            if let Some(status) = speaker.try_wait()? {
                bail!(
                    "the speaker on {} exited ({status}):\n{}",
                    self.lab.node(i).name(),
                    speaker.stderr().unwrap_or_default().trim_end()
                );
            }
        }
        Ok(())
    }

    fn print_log_tails(&self) {
        for (speaker, node) in self.speakers.iter().zip(self.lab.nodes()) {
            let log = speaker.stderr().unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
            println!("  --- {}'s speaker, last lines of its log ---", node.name());
            for line in tail {
                println!("  {line}");
            }
        }
    }

    /// `--keep`: says how to look around, then waits for Ctrl-C (or SIGTERM).
    fn keep(&self) {
        let lab = self.lab;
        let client = lab.client().netns();
        let vip = self
            .vip
            .map_or_else(|| "VIP".to_string(), |v| v.to_string());
        println!("  the lab stays up (--keep) until Ctrl-C; the killed speaker stays down");
        let width = lab.hosts().map(|h| h.netns().len()).max().unwrap_or(0);
        for host in lab.hosts() {
            println!(
                "    {:<7} {:<width$}  {} {} {}",
                host.name(),
                host.netns(),
                host.ipv4(),
                host.ipv6(),
                host.mac_string()
            );
        }
        println!("  try:");
        println!("    ip netns exec {client} arping -c 3 -i eth0 {vip}");
        println!("    ip netns exec {client} ip neigh show dev eth0");
        let node = lab.node(self.owner.unwrap_or(0));
        println!(
            "    ip netns exec {} nft list table inet ferrolb",
            node.netns()
        );
        println!(
            "  manifests (the speakers re-read them when they change): {}",
            lab.log_dir().join("manifests").display()
        );
        println!("  speaker logs: {}", lab.log_dir().display());
        while self.signals.received().is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The manifest directory's files: the Nodes (`nodes`), the pool with its
/// L2Advertisement, and the Service.
fn manifest_files(nodes: String) -> [(&'static str, String); 3] {
    [
        ("nodes.yaml", nodes),
        ("pool.yaml", pool_manifests()),
        ("service.yaml", service_manifest()),
    ]
}

fn write_manifests(dir: &Path, files: &[(&str, String)]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn pool_manifests() -> String {
    format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: lab}}\nspec:\n  \
         addresses: [{POOL_V4}, \"{POOL_V6}\"]\n---\napiVersion: ferrolb.io/v1beta1\n\
         kind: L2Advertisement\nmetadata: {{name: lab}}\nspec: {{forwarding: nodePort}}\n"
    )
}

fn service_manifest() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {SERVICE}, namespace: {NAMESPACE}}}\n\
         spec:\n  type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n  ports:\n  \
         - {{port: {PORT}, nodePort: {NODE_PORT}, protocol: TCP}}\n"
    )
}

/// The Service's IPv4 and IPv6 addresses, computed by the allocator every speaker runs
/// on the same manifests (it is deterministic).
/// Pure.
fn service_ips(files: &[(&str, String)]) -> Result<(Ipv4Addr, Option<Ipv6Addr>)> {
    let mut m = Manifests::default();
    for (name, text) in files {
        if let Some(e) = m.add_text(name, text).first() {
            bail!(
                "the lab's own manifests are invalid: {}: {}",
                e.origin,
                e.message
            );
        }
    }
    let plan = input::prepare(&m).plan(allocator::Start::Hashed);
    let key = ServiceKey::new(NAMESPACE, SERVICE);
    let ips: Vec<IpAddr> = plan
        .services
        .get(&key)
        .map(|o| o.assignments().iter().map(|a| a.ip).collect())
        .unwrap_or_default();
    let v4 = ips.iter().find_map(|ip| match ip {
        IpAddr::V4(v4) => Some(*v4),
        IpAddr::V6(_) => None,
    });
    let v6 = ips.iter().find_map(|ip| match ip {
        IpAddr::V6(v6) => Some(*v6),
        IpAddr::V4(_) => None,
    });
    let v4 = v4.with_context(|| format!("Service {key} got no IPv4 address from the pool"))?;
    Ok((v4, v6))
}

/// The signal that asked the lab to stop (0: none yet).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: nix::libc::c_int) {
    // Only an atomic store: the one thing a signal handler may safely do here.
    RECEIVED.store(signal, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set a flag the demonstration checks, so it stops and tears the lab
/// down. A second one kills at once (the handler resets itself); the namespaces left
/// then are removed by the next lab run. The previous handlers come back on drop.
struct Signals {
    previous: Vec<(nix::sys::signal::Signal, nix::sys::signal::SigAction)>,
}

/// The demonstration was stopped by a signal.
#[derive(Debug)]
struct Interrupted(i32);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted by signal {}", self.0)
    }
}

impl std::error::Error for Interrupted {}

impl Signals {
    fn install() -> Result<Signals> {
        use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
        RECEIVED.store(0, Ordering::SeqCst);
        let action = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::SA_RESETHAND | SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        let mut previous = Vec::new();
        for signal in [Signal::SIGINT, Signal::SIGTERM] {
            // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
            let old = unsafe { sigaction(signal, &action) }
                .with_context(|| format!("installing a handler for {signal}"))?;
            previous.push((signal, old));
        }
        Ok(Signals { previous })
    }

    fn received(&self) -> Option<i32> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal),
        }
    }

    fn check(&self) -> Result<()> {
        match self.received() {
            Some(signal) => Err(Interrupted(signal).into()),
            None => Ok(()),
        }
    }

    /// The signal's name, e.g. `SIGINT`.
    fn name(&self) -> String {
        match self.received() {
            Some(n) => nix::sys::signal::Signal::try_from(n)
                .map_or_else(|_| format!("signal {n}"), |s| s.to_string()),
            None => "no signal".to_string(),
        }
    }

    /// The shell's convention: 128 + the signal number.
    fn exit_code(&self) -> ExitCode {
        self.exit_code_or(ExitCode::from(1))
    }

    fn exit_code_or(&self, otherwise: ExitCode) -> ExitCode {
        match self.received() {
            Some(signal) => ExitCode::from(128u8.saturating_add(signal as u8)),
            None => otherwise,
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        for (signal, old) in &self.previous {
            // SAFETY: restores the handler that was installed before ours.
            let _ = unsafe { nix::sys::signal::sigaction(*signal, old) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_names_every_prerequisite() {
        use clap::Args as _;
        let help = LabArgs::augment_args(clap::Command::new("lab"))
            .render_long_help()
            .to_string();
        for needed in [
            "root",
            "iproute2",
            "nftables",
            "arping",
            "ndisc6",
            "iputils-ping",
        ] {
            assert!(help.contains(needed), "{needed} missing from: {help}");
        }
    }

    #[test]
    fn the_demo_service_gets_one_address_per_family_from_the_pool() {
        let (v4, v6) = service_ips(&manifest_files(String::new())).unwrap();
        assert!((200..=250).contains(&v4.octets()[3]), "{v4}");
        assert!(v4.to_string().starts_with("192.0.2."), "{v4}");
        let v6 = v6.expect("an IPv6 address too");
        assert!(v6.to_string().starts_with("2001:db8::2"), "{v6}");
    }
}
