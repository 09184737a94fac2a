//! One machine of the lab: a node or the client, each a network namespace with `eth0`
//! plugged into the lab's switch.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use super::{IFNAME, LabProcess, format_mac, parse_mac, sys};

/// Numbers spawned processes' log files so that two runs of one program never share one.
static NEXT_SPAWN: AtomicU64 = AtomicU64::new(0);

/// A node or the client of a [`Lab`](super::Lab).
#[derive(Debug, Clone)]
pub struct Host {
    pub(crate) name: String,
    pub(crate) netns: String,
    pub(crate) switch_netns: String,
    pub(crate) switch_port: String,
    pub(crate) mac: [u8; 6],
    pub(crate) ipv4: Ipv4Addr,
    pub(crate) ipv6: Ipv6Addr,
    pub(crate) log_dir: PathBuf,
}

impl Host {
    /// A short role name: `node0`, `node1`, …, `client`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The network namespace (as in `ip netns list`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// The host's interface towards the switch, inside its namespace: always `eth0`.
    pub fn ifname(&self) -> &str {
        IFNAME
    }

    /// The MAC of `eth0` (fixed, so tests can compare it with what ARP/NDP return).
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// [`Host::mac`] as `02:00:00:01:00:0a`.
    pub fn mac_string(&self) -> String {
        format_mac(&self.mac)
    }

    /// The IPv4 address on `eth0` (prefix length [`IPV4_PREFIX_LEN`](super::IPV4_PREFIX_LEN)).
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The IPv6 address on `eth0` (prefix length [`IPV6_PREFIX_LEN`](super::IPV6_PREFIX_LEN)).
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// The switch-side end of this host's veth, inside [`Lab::switch_netns`](super::Lab::switch_netns)
    /// (where to capture this host's frames from outside it).
    pub fn switch_port(&self) -> &str {
        &self.switch_port
    }

    /// A command that runs `program args…` inside this host's namespace
    /// (`ip netns exec NETNS program args…`).
    pub fn command<P, I, S>(&self, program: P, args: I) -> Command
    where
        P: AsRef<OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec"])
            .arg(&self.netns)
            .arg(program)
            .args(args);
        cmd
    }

    /// Runs `program args…` in this host to completion; an error names the host, the
    /// command and its stderr unless it exits 0.
    pub fn run<P, I, S>(&self, program: P, args: I) -> Result<Output>
    where
        P: AsRef<OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        sys::run(&self.name, &mut self.command(program, args))
    }

    /// Starts `program args…` in this host in the background; see [`LabProcess`].
    pub fn spawn<P, I, S>(&self, program: P, args: I) -> Result<LabProcess>
    where
        P: AsRef<OsStr>,
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn_command(self.command(program, args))
    }

    /// Starts a command built with [`Host::command`] (e.g. after adding environment
    /// variables). Its stdin, stdout, stderr and process group are set here.
    pub fn spawn_command(&self, cmd: Command) -> Result<LabProcess> {
        let seq = NEXT_SPAWN.fetch_add(1, Ordering::Relaxed);
        // `ip netns exec NETNS PROGRAM …`: name the logs after PROGRAM.
        let args: Vec<&OsStr> = cmd.get_args().collect();
        let program = match args.as_slice() {
            [netns, exec, _, program, ..] if *netns == "netns" && *exec == "exec" => *program,
            _ => cmd.get_program(),
        };
        let program = std::path::Path::new(program)
            .file_name()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = format!("{}-{seq}-{program}", self.name);
        std::fs::create_dir_all(&self.log_dir)
            .with_context(|| format!("creating {}", self.log_dir.display()))?;
        LabProcess::start(
            self.name.clone(),
            cmd,
            self.log_dir.join(format!("{stem}.stdout")),
            self.log_dir.join(format!("{stem}.stderr")),
        )
    }

    /// Plugs the host's cable in (`true`) or pulls it (`false`), by setting the
    /// switch-side end of its veth up or down. Inside the host `eth0` stays
    /// administratively up and only loses carrier, as when a node or its switch port
    /// dies; nothing the host runs is told why.
    pub fn set_link(&self, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        sys::run(
            &self.name,
            Command::new("ip").args([
                "-n",
                &self.switch_netns,
                "link",
                "set",
                &self.switch_port,
                state,
            ]),
        )
        .map(drop)
    }

    /// Makes the switch drop every frame to and from this host (`true`), or stop
    /// (`false`), while the host's link stays up: a bad cable or switch port that no
    /// carrier change shows, as a bridge-family nftables table on the switch.
    pub fn set_dropping(&self, dropping: bool) -> Result<()> {
        let table = format!("dropping_{}", self.switch_port.replace('-', "_"));
        let script = if dropping {
            format!(
                "table bridge {table} {{\n chain forward {{ type filter hook forward priority 0; \
                 iifname \"{port}\" drop; oifname \"{port}\" drop; }}\n}}\n",
                port = self.switch_port
            )
        } else {
            format!("delete table bridge {table}\n")
        };
        sys::run_with_input(
            &self.name,
            Command::new("ip").args(["netns", "exec", &self.switch_netns, "nft", "-f", "-"]),
            Some(&script),
        )
        .map(drop)
    }

    /// The MAC this host's neighbour table holds for `ip` on `eth0`, in any state that
    /// has one except FAILED and INCOMPLETE (so STALE counts: the host would use it).
    pub fn neighbour(&self, ip: impl Into<IpAddr>) -> Result<Option<[u8; 6]>> {
        let ip = ip.into();
        let output = sys::run(
            &self.name,
            Command::new("ip").args(["-n", &self.netns, "-j", "neigh", "show", "dev", IFNAME]),
        )?;
        let text = String::from_utf8_lossy(&output.stdout);
        neighbour_in(&text, ip)
            .with_context(|| format!("{}: parsing `ip -j neigh show`: {text}", self.name))
    }

    /// The MACs that answered one `arping` (Thomas Habets' arping) from this host for
    /// `ip`, one entry per reply, within a second.
    pub fn arping(&self, ip: impl Into<IpAddr>) -> Vec<[u8; 6]> {
        self.arping_within(ip, Duration::from_secs(1))
    }

    /// [`Host::arping`] waiting at most `wait` for a reply: a short wait polls finely
    /// while nobody answers.
    pub fn arping_within(&self, ip: impl Into<IpAddr>, wait: Duration) -> Vec<[u8; 6]> {
        let ip = ip.into().to_string();
        let wait = format!("{:.3}", wait.as_secs_f64());
        let Ok(out) = self
            .command("arping", ["-c", "1", "-w", &wait, "-i", IFNAME, &ip])
            .output()
        else {
            return vec![];
        };
        // "60 bytes from 02:00:00:01:00:0a (192.0.2.10): index=0 time=12.503 usec"
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let rest = l.split_once(" bytes from ")?.1;
                let (mac, rest) = rest.split_once(' ')?;
                rest.starts_with(&format!("({ip})"))
                    .then(|| parse_mac(mac))?
            })
            .collect()
    }

    /// The MAC `ndisc6` learns for `ip` from this host, if any host answers within a
    /// second.
    pub fn ndisc6(&self, ip: impl Into<IpAddr>) -> Option<[u8; 6]> {
        let ip = ip.into().to_string();
        let out = self
            .command("ndisc6", ["-1", "-q", "-r", "1", "-w", "1000", &ip, IFNAME])
            .output()
            .ok()?;
        // -q prints only the target link-layer address, e.g. "02:00:00:01:00:0A".
        out.status
            .success()
            .then(|| parse_mac(&String::from_utf8_lossy(&out.stdout)))?
    }

    /// Runs `f` on a thread inside this host's network namespace: sockets it opens
    /// belong to the host.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = std::path::Path::new(sys::NETNS_DIR).join(&self.netns);
        super::netns::run_in(&self.name, &path, f)
    }

    /// Forgets every neighbour entry on `eth0`, so the next packet resolves afresh.
    pub fn flush_neighbours(&self) -> Result<()> {
        sys::run(
            &self.name,
            Command::new("ip").args(["-n", &self.netns, "neigh", "flush", "dev", IFNAME]),
        )
        .map(drop)
    }
}

#[derive(Deserialize)]
struct Neighbour {
    dst: IpAddr,
    #[serde(default)]
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

/// Finds `ip`'s usable MAC in `ip -j neigh show` output.
fn neighbour_in(json: &str, ip: IpAddr) -> Result<Option<[u8; 6]>> {
    // `ip -j` prints nothing at all (not `[]`) on some versions when the table is empty.
    if json.trim().is_empty() {
        return Ok(None);
    }
    let entries: Vec<Neighbour> = serde_json::from_str(json)?;
    for entry in entries {
        if entry.dst != ip
            || entry
                .state
                .iter()
                .any(|s| s == "FAILED" || s == "INCOMPLETE")
        {
            continue;
        }
        let Some(lladdr) = entry.lladdr else { continue };
        match parse_mac(&lladdr) {
            Some(mac) => return Ok(Some(mac)),
            None => bail!("neighbour {ip} has a malformed lladdr {lladdr:?}"),
        }
    }
    Ok(None)
}

impl super::Origin for Host {
    fn name(&self) -> &str {
        &self.name
    }

    fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        Host::in_netns(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = r#"[
        {"dst":"192.0.2.10","dev":"eth0","lladdr":"02:00:00:01:00:0a","state":["STALE"]},
        {"dst":"192.0.2.11","dev":"eth0","state":["FAILED"]},
        {"dst":"192.0.2.12","dev":"eth0","lladdr":"02:00:00:01:00:0c","state":["INCOMPLETE"]},
        {"dst":"2001:db8::10","dev":"eth0","lladdr":"02:00:00:01:00:0a","router":null,"state":["REACHABLE"]}
    ]"#;

    #[test]
    fn usable_entries_are_found_in_either_family() {
        let mac = [2, 0, 0, 1, 0, 0x0a];
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8:0::10".parse().unwrap();
        assert_eq!(neighbour_in(TABLE, v4).unwrap(), Some(mac));
        assert_eq!(neighbour_in(TABLE, v6).unwrap(), Some(mac));
    }

    #[test]
    fn failed_incomplete_and_absent_entries_are_none() {
        for ip in ["192.0.2.11", "192.0.2.12", "192.0.2.99"] {
            assert_eq!(neighbour_in(TABLE, ip.parse().unwrap()).unwrap(), None);
        }
        assert_eq!(
            neighbour_in("", "192.0.2.10".parse().unwrap()).unwrap(),
            None
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let ip = "192.0.2.10".parse().unwrap();
        let err = neighbour_in("{", ip).expect_err("not JSON");
        assert!(err.to_string().contains("expected a sequence"), "{err:#}");
        let bad = r#"[{"dst":"192.0.2.10","lladdr":"zz","state":["STALE"]}]"#;
        let err = neighbour_in(bad, ip).expect_err("a malformed lladdr");
        assert_eq!(
            err.to_string(),
            "neighbour 192.0.2.10 has a malformed lladdr \"zz\""
        );
    }
}
