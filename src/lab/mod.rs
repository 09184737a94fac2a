//! A network-namespace lab: a switch, N nodes and a client on one Ethernet segment, with
//! real kernels, so ferrolb's data plane and failover are proven on real frames.
//!
//! ```text
//!   node0 (eth0 192.0.2.10, 2001:db8::10) ──┐
//!   node1 (eth0 192.0.2.11, 2001:db8::11) ──┼── switch (a bridge, its own namespace)
//!   client (eth0 192.0.2.100, 2001:db8::100)┘
//! ```
//!
//! Every host is a network namespace joined to the switch by a veth pair. Every lab uses
//! the same documentation prefixes, which is fine because each lab has its own switch;
//! namespace and link names carry the process id and a per-process counter, so labs
//! built in parallel (threads or processes) never collide. Nothing is added to the
//! machine's own namespace. Dropping a [`Lab`] kills whatever runs in it and deletes it,
//! also when a test panics; [`Lab::new`] first removes what crashed runs left behind.
//! [`Lab::relay`] makes a service of the machine (a test's API server) reachable from
//! the hosts at the switch's own address, [`GATEWAY_IPV4`].

mod gateway;
mod host;
mod netns;
mod outage;
mod process;
mod speakers;
mod sys;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use gateway::{GATEWAY_IPV4, Relay};
pub use host::Host;
pub use netns::{Netns, Origin};
pub use outage::*;
pub use process::LabProcess;

/// Every lab namespace name starts with this, followed by `PID-COUNTER-`.
pub const NETNS_PREFIX: &str = "ferrolb-lab-";
/// Each host's interface towards the switch.
pub const IFNAME: &str = "eth0";
/// The lab's IPv4 subnet (RFC 5737 TEST-NET-1).
pub const IPV4_SUBNET: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 0);
pub const IPV4_PREFIX_LEN: u8 = 24;
/// The lab's IPv6 subnet (RFC 3849 documentation prefix).
pub const IPV6_SUBNET: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0);
pub const IPV6_PREFIX_LEN: u8 = 64;
/// The last octet (IPv4) and last group (IPv6) of the client's addresses.
pub const CLIENT_HOST_ID: u8 = 100;
/// Node i gets host id `FIRST_NODE_HOST_ID + i`.
pub const FIRST_NODE_HOST_ID: u8 = 10;
/// Nodes fit between the first node id and the client's.
pub const MAX_NODES: usize = (CLIENT_HOST_ID - FIRST_NODE_HOST_ID) as usize;

/// How often waits re-check their condition.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Distinguishes labs built by one process.
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// A switch with `N` nodes and one client. See the [module docs](self).
#[derive(Debug)]
pub struct Lab {
    id: String,
    switch_netns: String,
    bridge: String,
    nodes: Vec<Host>,
    client: Host,
    teardown: Teardown,
}

impl Lab {
    /// Builds a lab with `nodes` node hosts and one client, ready for traffic when this
    /// returns (addresses are usable at once: no duplicate address detection).
    ///
    /// Needs root and `ip` (iproute2). Removes namespaces left by crashed runs first.
    pub fn new(nodes: usize) -> Result<Lab> {
        if nodes > MAX_NODES {
            bail!("a lab has at most {MAX_NODES} nodes, {nodes} were asked for");
        }
        missing_prerequisites(&[("ip", "iproute2")]).map_err(anyhow::Error::msg)?;
        Lab::remove_stale().context("removing namespaces left by earlier lab runs")?;

        let pid = std::process::id();
        let counter = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let id = format!("{pid}-{counter}");
        let prefix = format!("{NETNS_PREFIX}{id}-");
        // Link names live inside the lab's own namespaces, so they only need to be short
        // (at most 15 bytes) and recognisable: the pid and counter in hex.
        let tag = format!("{pid:x}x{:x}", counter % 0x1000);
        let log_dir = std::env::temp_dir().join(format!("ferrolb-lab-{id}"));
        let lab_byte = (counter % 256) as u8;

        let switch_netns = format!("{prefix}switch");
        let bridge = format!("br{tag}");
        let host = |name: String, port: String, host_id: u8| Host {
            netns: format!("{prefix}{name}"),
            name,
            switch_netns: switch_netns.clone(),
            switch_port: port,
            mac: [0x02, 0, 0, lab_byte, 0, host_id],
            ipv4: host_ipv4(host_id),
            ipv6: host_ipv6(host_id),
            log_dir: log_dir.clone(),
        };
        let node_hosts: Vec<Host> = (0..nodes)
            .map(|i| {
                host(
                    format!("node{i}"),
                    format!("n{i}{tag}"),
                    FIRST_NODE_HOST_ID + i as u8,
                )
            })
            .collect();
        let client = host("client".to_string(), format!("cl{tag}"), CLIENT_HOST_ID);
        for name in std::iter::once(&bridge)
            .chain(node_hosts.iter().chain([&client]).map(|h| &h.switch_port))
        {
            if name.len() > 15 {
                bail!("interface name {name} is longer than 15 bytes");
            }
        }

        let mut lab = Lab {
            id,
            switch_netns,
            bridge,
            nodes: node_hosts,
            client,
            teardown: Teardown {
                netns: Vec::new(),
                log_dir,
                done: false,
            },
        };
        // From here on, a failure drops `lab`, which deletes whatever was made.
        lab.teardown.netns = std::iter::once(lab.switch_netns.clone())
            .chain(lab.hosts().map(|h| h.netns.clone()))
            .collect();
        lab.build()
            .with_context(|| format!("building network-namespace lab {}", lab.id))?;
        Ok(lab)
    }

    fn build(&self) -> Result<()> {
        let add: Vec<String> = self
            .teardown
            .netns
            .iter()
            .map(|ns| format!("netns add {ns}"))
            .collect();
        sys::ip_batch("creating namespaces", None, false, &add)?;

        // The switch is a pure layer-2 device: no IPv6 of its own, so it never sends
        // router solicitations or MLD reports that tests capturing frames would see.
        // Hosts skip duplicate address detection, so their addresses work at once.
        self.write_sysctls(
            "switch",
            &self.switch_netns,
            &[
                "ipv6/conf/all/disable_ipv6",
                "ipv6/conf/default/disable_ipv6",
            ],
            "1",
        )?;
        for host in self.hosts() {
            self.write_sysctls(
                &host.name,
                &host.netns,
                &["ipv6/conf/all/accept_dad", "ipv6/conf/default/accept_dad"],
                "0",
            )?;
        }

        // Multicast snooping off: with no MLD querier on the segment the bridge must
        // flood solicited-node multicast, or NDP would depend on report timing.
        let mut switch = vec![
            "link set lo up".to_string(),
            format!("link add {} type bridge mcast_snooping 0", self.bridge),
            format!("link set {} up", self.bridge),
        ];
        for host in self.hosts() {
            switch.push(format!(
                "link add {} type veth peer name {IFNAME} address {} netns {}",
                host.switch_port,
                host.mac_string(),
                host.netns
            ));
            switch.push(format!(
                "link set {} master {} up",
                host.switch_port, self.bridge
            ));
        }
        sys::ip_batch("switch", Some(&self.switch_netns), false, &switch)?;

        for host in self.hosts() {
            let lines = [
                "link set lo up".to_string(),
                format!("addr add {}/{IPV4_PREFIX_LEN} dev {IFNAME}", host.ipv4),
                format!(
                    "addr add {}/{IPV6_PREFIX_LEN} dev {IFNAME} nodad",
                    host.ipv6
                ),
                format!("link set {IFNAME} up"),
            ];
            sys::ip_batch(&host.name, Some(&host.netns), false, &lines)?;
        }
        Ok(())
    }

    /// Writes `value` to `/proc/sys/net/KEY` inside `netns` (sysctls under net/ are per
    /// namespace, so this has to run in it).
    fn write_sysctls(&self, who: &str, netns: &str, keys: &[&str], value: &str) -> Result<()> {
        let script = keys
            .iter()
            .map(|k| format!("echo {value} > /proc/sys/net/{k}"))
            .collect::<Vec<_>>()
            .join(" && ");
        sys::run(
            who,
            Command::new("ip").args(["netns", "exec", netns, "sh", "-c", &script]),
        )
        .map(drop)
    }

    /// Says plainly what the lab and its tests need that this machine lacks: root,
    /// `ip` (iproute2), `nft` (nftables), `arping` (Thomas Habets' arping, package
    /// arping), `ndisc6` (ndisc6) and `ping` (iputils-ping).
    pub fn check_prerequisites() -> Result<(), String> {
        missing_prerequisites(&[
            ("ip", "iproute2"),
            ("nft", "nftables"),
            ("arping", "arping"),
            ("ndisc6", "ndisc6"),
            ("ping", "iputils-ping"),
        ])
    }

    /// Deletes lab namespaces whose creating process no longer exists (a run killed
    /// before its guards ran, even with SIGKILL), killing anything still running inside
    /// them, and those runs' log directories (`ferrolb-lab-PID-N` in the temporary
    /// directory). Returns the names of the namespaces and directories removed.
    pub fn remove_stale() -> Result<Vec<String>> {
        let dead = |name: &str| {
            name.strip_prefix(NETNS_PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !sys::pid_alive(pid))
        };
        let mut stale: Vec<String> = sys::named_netns()?
            .into_iter()
            .filter(|name| dead(name))
            .collect();
        sys::destroy_netns("removing stale lab", &stale)?;
        let tmp = std::env::temp_dir();
        let entries =
            std::fs::read_dir(&tmp).with_context(|| format!("listing {}", tmp.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !dead(&name) || !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = entry.path();
            match std::fs::remove_dir_all(&path) {
                Ok(()) => stale.push(path.display().to_string()),
                // Another run's cleanup got there first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
            }
        }
        Ok(stale)
    }

    /// This lab's unique id, `PID-COUNTER`, part of every namespace name.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The namespace holding the switch (the bridge and the hosts' switch ports).
    pub fn switch_netns(&self) -> &str {
        &self.switch_netns
    }

    /// The bridge's name inside [`Lab::switch_netns`].
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The node hosts, node i at index i.
    pub fn nodes(&self) -> &[Host] {
        &self.nodes
    }

    /// Node `i`.
    ///
    /// # Panics
    /// If the lab has no node `i` (a bug in the caller; use [`Lab::nodes`] to probe).
    pub fn node(&self, i: usize) -> &Host {
        match self.nodes.get(i) {
            Some(node) => node,
            None => panic!(
                "lab {} has {} nodes, no node {i}",
                self.id,
                self.nodes.len()
            ),
        }
    }

    /// The client host.
    /// The index of the node with this MAC (what an ARP reply or a neighbour entry
    /// names), if it is one of this lab's nodes.
    pub fn node_with_mac(&self, mac: [u8; 6]) -> Option<usize> {
        self.nodes().iter().position(|n| n.mac() == mac)
    }

    pub fn client(&self) -> &Host {
        &self.client
    }

    /// Every host: the nodes in order, then the client.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> {
        self.nodes.iter().chain(std::iter::once(&self.client))
    }

    /// Every namespace of this lab (switch first).
    pub fn netns(&self) -> &[String] {
        &self.teardown.netns
    }

    /// Where spawned processes' output goes; deleted on teardown unless a panic is
    /// unwinding (then it is kept and its path printed, for the failure's logs).
    pub fn log_dir(&self) -> &Path {
        &self.teardown.log_dir
    }

    /// Tears the lab down now and reports errors (dropping does the same, printing them).
    pub fn close(mut self) -> Result<()> {
        self.teardown.run()
    }
}

/// The cleanup half of a lab, separate so that a half-built lab is torn down too.
#[derive(Debug)]
struct Teardown {
    netns: Vec<String>,
    log_dir: PathBuf,
    done: bool,
}

impl Teardown {
    fn run(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.done, true) {
            return Ok(());
        }
        let destroyed = sys::destroy_netns("lab teardown", &self.netns);
        if std::thread::panicking() && self.log_dir.exists() {
            eprintln!(
                "ferrolb lab: keeping logs of the failed run in {}",
                self.log_dir.display()
            );
        } else {
            match std::fs::remove_dir_all(&self.log_dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return destroyed.and(
                        Err(e).with_context(|| format!("removing {}", self.log_dir.display())),
                    );
                }
                _ => {}
            }
        }
        destroyed
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Err(e) = self.run() {
            eprintln!("ferrolb lab: {e:#}");
        }
    }
}

fn host_ipv4(host_id: u8) -> Ipv4Addr {
    let [a, b, c, _] = IPV4_SUBNET.octets();
    Ipv4Addr::new(a, b, c, host_id)
}

fn host_ipv6(host_id: u8) -> Ipv6Addr {
    let mut segments = IPV6_SUBNET.segments();
    // Written like the IPv4 one: host 100 is 2001:db8::100, easy to read in captures.
    segments[7] = u16::from_str_radix(&host_id.to_string(), 16).unwrap_or(u16::from(host_id));
    Ipv6Addr::from(segments)
}

/// Root plus each `(program, Debian package)`, or one message listing what is missing.
fn missing_prerequisites(programs: &[(&str, &str)]) -> Result<(), String> {
    let mut missing = Vec::new();
    match sys::effective_uid() {
        Some(0) => {}
        Some(uid) => missing.push(format!(
            "root (running as uid {uid}; namespaces, veths and bridges need it)"
        )),
        None => missing.push("root (cannot read the uid from /proc/self/status)".to_string()),
    }
    let mut packages = Vec::new();
    for (program, package) in programs {
        if !sys::on_path(program) {
            missing.push(format!("`{program}` (Debian package {package})"));
            packages.push(*package);
        } else if *program == "arping" && !is_habets_arping() {
            missing.push(
                "Thomas Habets' `arping` (Debian package arping; the one on PATH has other \
                 options, e.g. iputils-arping)"
                    .to_string(),
            );
            packages.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut message = format!(
        "the network-namespace lab cannot run here; missing: {}",
        missing.join(", ")
    );
    if !packages.is_empty() {
        message.push_str(&format!(
            ". Install with: apt-get update && apt-get install -y {}",
            packages.join(" ")
        ));
    }
    Err(message)
}

fn is_habets_arping() -> bool {
    Command::new("arping")
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| {
            String::from_utf8_lossy(&o.stdout).contains("Habets")
                || String::from_utf8_lossy(&o.stderr).contains("Habets")
        })
}

/// Calls `f` every few milliseconds until it returns `Some`, or fails after `deadline`
/// saying what was awaited. Tests synchronise with this, never with sleeps.
pub fn poll_until<T>(
    deadline: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = f() {
            return Ok(value);
        }
        if start.elapsed() >= deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

pub use ferrolb_speaker::mac::{format as format_mac, parse as parse_mac};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_directories_of_dead_runs_are_removed_and_live_ones_kept() {
        // No process ever has this pid (pid_max is at most 2^22).
        let dead = std::env::temp_dir().join(format!("{NETNS_PREFIX}{}-0", u32::MAX - 1));
        let alive = std::env::temp_dir().join(format!("{NETNS_PREFIX}{}-4242", std::process::id()));
        for dir in [&dead, &alive] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("node0.log"), "log\n").unwrap();
        }
        let result = Lab::remove_stale();
        let alive_kept = alive.exists();
        std::fs::remove_dir_all(&alive).unwrap();
        result.unwrap();
        assert!(!dead.exists(), "{} is left", dead.display());
        assert!(alive_kept, "a live run's directory was removed");
    }

    #[test]
    fn host_addresses_read_the_same_in_both_families() {
        assert_eq!(host_ipv4(10).to_string(), "192.0.2.10");
        assert_eq!(host_ipv6(10).to_string(), "2001:db8::10");
        assert_eq!(host_ipv6(CLIENT_HOST_ID).to_string(), "2001:db8::100");
    }

    #[test]
    fn poll_until_names_what_it_waited_for() {
        let err = poll_until(Duration::from_millis(20), "the moon", || None::<()>).unwrap_err();
        assert!(err.to_string().contains("the moon"), "{err}");
        let mut calls = 0;
        assert_eq!(
            poll_until(Duration::from_secs(1), "three calls", || {
                calls += 1;
                (calls == 3).then_some(calls)
            })
            .unwrap(),
            3
        );
    }
}
