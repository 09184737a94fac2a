//! NodePort forwarding: on the owner node, DNAT `VIP:port/protocol` to
//! `<this node's InternalIP>:<nodePort>`, so traffic reaches the Service where no
//! kube-proxy handles LoadBalancer IPs (L2Advertisement `forwarding: nodePort`).
//!
//! Everything lives in one nftables table of ferrolb's own, `inet ferrolb`. Tables are
//! nftables' namespaces: whatever kube-proxy, firewalld or the administrator keep in
//! theirs is never listed or written here, and withdrawing is one `delete table`.
//! [`Forwarder::apply`] writes:
//!
//! ```text
//! table inet ferrolb {
//!     chain prerouting {   # traffic arriving from the segment
//!         type nat hook prerouting priority dstnat + 10; policy accept;
//!         ip daddr 192.0.2.200 tcp dport 80 counter dnat ip to 192.0.2.2:30080 comment "ferrolb tcp 192.0.2.200:80"
//!         # a Service with spec.loadBalancerSourceRanges: [10.0.0.0/8]
//!         ip daddr 192.0.2.201 tcp dport 443 ip saddr { 10.0.0.0/8 } counter dnat ip to 192.0.2.2:30443 comment "ferrolb tcp 192.0.2.201:443"
//!         ip daddr 192.0.2.201 tcp dport 443 counter drop comment "ferrolb tcp 192.0.2.201:443 source ranges"
//!     }
//!     chain output {       # traffic the node sends itself
//!         type nat hook output priority dstnat + 10; policy accept;
//!         (the same rules)
//!     }
//! }
//! ```
//!
//! `spec.loadBalancerSourceRanges` is honoured as kube-proxy honours it: traffic to the
//! VIP's port from outside the ranges is dropped, not forwarded (ranges of the other
//! family are ignored, and a Service whose ranges hold none of the VIP's family is open
//! to that family, as kube-proxy does; entries that are not CIDRs are ignored and
//! reported). Without the rule the NodePort forward would let anyone in.
//!
//! Priority `dstnat + 10` (-90), not `dstnat` (-100): kube-proxy's NAT chains (nftables
//! mode `nat-prerouting`/`nat-output`, and iptables-nft's `PREROUTING`/`OUTPUT`) sit at
//! exactly `dstnat`, and two chains of one hook at one priority run in an order nobody
//! chose. The kernel applies only the first destination NAT a new connection meets in a
//! hook (later nat chains are skipped), so running after kube-proxy means: where
//! kube-proxy handles the LoadBalancer IP its translation wins, as it would without
//! ferrolb, and ferrolb's rules take only what kube-proxy leaves alone. Still before
//! `srcnat` (100) and after kube-proxy's own source-range firewall (`dstnat - 10`).
//!
//! Why an `output` chain: the speaker answers ARP/NDP for a VIP without assigning it
//! to an interface, so a packet the owner node (or a hostNetwork pod on it) sends to
//! its own VIP would leave by the default route and never pass `prerouting`. With the
//! output chain `curl VIP:port` on the owner behaves as from any client. Chains exist
//! only while there is at least one rule, so an idle speaker hooks nothing.
//!
//! The translation keeps the client's source address (no SNAT): the Service sees the
//! real client, and replies leave through conntrack's reverse translation.
//!
//! `nft` runs as a child process fed JSON (`nft -j -f -`); the `nftables` crate
//! provides the schema types. Its runner functions are not used because they leave
//! nft's stderr unread (errors would lose nft's message) and put `-j` straight after
//! the program, which breaks `ip netns exec NS nft`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nftables::batch::Batch;
use nftables::expr::{Expression, NamedExpression, Payload, PayloadField};
use nftables::schema::{Chain, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{AnonymousCounter, Counter, Match, NAT, NATFamily, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

/// Name of ferrolb's table (family `inet`, so one table serves IPv4 and IPv6).
pub const TABLE: &str = "ferrolb";

/// `priority dstnat + 10`: after kube-proxy's NAT chains at `dstnat` (-100), see the
/// module documentation.
pub const PRIORITY: i32 = -90;

/// How long one `nft` run may take before it is killed and reported: nft answers in
/// milliseconds; a wedged one (a kernel lock, a hung netlink socket) must not stall
/// the speaker's loop forever.
pub const NFT_TIMEOUT: Duration = Duration::from_secs(10);

/// The base chains [`Forwarder::apply`] creates, each holding every rule.
const CHAINS: [(&str, NfHook); 2] = [
    ("prerouting", NfHook::Prerouting),
    ("output", NfHook::Output),
];

/// Transport protocol of a forwarded Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// nft's name for the protocol (also its payload header name).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One forwarded port: `vip:port/protocol` is translated to `node_ip:node_port`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ForwardRule {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub node_ip: IpAddr,
    pub node_port: u16,
    /// The clients allowed (from `spec.loadBalancerSourceRanges`), as sorted, merged,
    /// inclusive address ranges of the VIP's family ([`source_ranges`]); empty:
    /// everyone.
    pub sources: Vec<(IpAddr, IpAddr)>,
}

/// The address ranges of `ranges` in `vip`'s family, sorted and merged (overlapping or
/// adjacent ranges become one), which is how nft lists them back too.
pub fn source_ranges(vip: IpAddr, ranges: &[ipnetwork::IpNetwork]) -> Vec<(IpAddr, IpAddr)> {
    let intervals: Vec<(u128, u128)> = ranges
        .iter()
        .filter(|n| n.is_ipv4() == vip.is_ipv4())
        .map(|n| (to_u128(n.network()), to_u128(n.broadcast_or_last())))
        .collect();
    merge(intervals)
        .into_iter()
        .map(|(a, b)| (from_u128(vip, a), from_u128(vip, b)))
        .collect()
}

trait LastAddress {
    fn broadcast_or_last(&self) -> IpAddr;
}

impl LastAddress for ipnetwork::IpNetwork {
    /// The last address of the network, for both families.
    fn broadcast_or_last(&self) -> IpAddr {
        match self {
            ipnetwork::IpNetwork::V4(n) => IpAddr::V4(n.broadcast()),
            ipnetwork::IpNetwork::V6(n) => {
                let host_bits = 128 - u32::from(n.prefix());
                let mask = if host_bits == 128 {
                    u128::MAX
                } else {
                    (1u128 << host_bits) - 1
                };
                IpAddr::V6((u128::from(n.network()) | mask).into())
            }
        }
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn from_u128(family_of: IpAddr, n: u128) -> IpAddr {
    match family_of {
        IpAddr::V4(_) => IpAddr::V4((n as u32).into()),
        IpAddr::V6(_) => IpAddr::V6(n.into()),
    }
}

/// The prefix length of the range `a..=b` if it is exactly one network (so that nft
/// lists what an administrator would write), else None.
fn prefix_len(a: IpAddr, b: IpAddr) -> Option<u8> {
    let bits: u32 = if a.is_ipv4() { 32 } else { 128 };
    let (a, b) = (to_u128(a), to_u128(b));
    let span = b.checked_sub(a)?;
    let host_bits = 128 - span.leading_zeros();
    let all_ones = span.count_ones() == host_bits;
    (all_ones && a & span == 0 && host_bits < bits).then(|| (bits - host_bits) as u8)
}

/// Sorted, with overlapping and adjacent intervals joined.
fn merge(mut intervals: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    intervals.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(intervals.len());
    for (start, end) in intervals {
        match out.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

impl ForwardRule {
    fn vip_socket(&self) -> SocketAddr {
        SocketAddr::new(self.vip, self.port)
    }

    fn node_socket(&self) -> SocketAddr {
        SocketAddr::new(self.node_ip, self.node_port)
    }

    /// Written as the nft rule comment, so `nft list table inet ferrolb` shows which
    /// Service port a rule (and its counter) belongs to.
    fn comment(&self) -> String {
        format!("ferrolb {} {}", self.protocol, self.vip_socket())
    }

    /// The key two rules may not share with different targets.
    fn key(&self) -> (IpAddr, u16, Protocol) {
        (self.vip, self.port, self.protocol)
    }
}

impl fmt::Display for ForwardRule {
    /// `tcp 192.0.2.200:80 -> 192.0.2.2:30080` (IPv6 in brackets).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} -> {}",
            self.protocol,
            self.vip_socket(),
            self.node_socket()
        )?;
        if !self.sources.is_empty() {
            let ranges: Vec<String> = self
                .sources
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            write!(f, " from {}", ranges.join(", "))?;
        }
        Ok(())
    }
}

/// Why forwarding could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardingError {
    #[error(
        "`nft` was not found while {action} (ran `{command}`); install the Debian package `nftables`"
    )]
    NftNotInstalled { action: String, command: String },
    #[error(
        "`ip` was not found while {action} (needed to run nft in network namespace {netns}); install the Debian package `iproute2`"
    )]
    IpNotInstalled { action: String, netns: String },
    #[error("could not run `{command}` while {action}: {source}")]
    Spawn {
        action: String,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` did not finish within {timeout:?} while {action}; it was killed")]
    TimedOut {
        action: String,
        command: String,
        timeout: Duration,
    },
    #[error("`{command}` failed while {action} ({status}): {stderr}")]
    NftFailed {
        action: String,
        command: String,
        status: String,
        stderr: String,
    },
    #[error("could not parse the JSON of `{command}`: {source}")]
    BadOutput {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("forwarding rule {rule}: the VIP and the node IP are of different IP families")]
    FamilyMismatch { rule: Box<ForwardRule> },
    #[error(
        "forwarding rules {first} and {second} claim the same VIP, port and protocol with different targets"
    )]
    Conflict {
        first: Box<ForwardRule>,
        second: Box<ForwardRule>,
    },
    #[error(
        "chain {chain} of table inet ferrolb holds a rule ferrolb did not write: {rule}; Forwarder::reset rebuilds the table"
    )]
    UnexpectedRule { chain: String, rule: String },
}

/// Runs `nft` against ferrolb's table, in the current or in a named network namespace.
#[derive(Debug, Clone)]
pub struct Forwarder {
    /// Program and the arguments that come before nft's own.
    command: Vec<String>,
    /// Set when the command is `ip netns exec NETNS nft`, for error messages.
    netns: Option<String>,
    /// How long one nft run may take ([`NFT_TIMEOUT`] unless changed).
    timeout: Duration,
}

impl Default for Forwarder {
    fn default() -> Self {
        Self::new()
    }
}

impl Forwarder {
    /// Runs `nft` from `PATH` in the current network namespace.
    pub fn new() -> Forwarder {
        Forwarder::with_nft("nft")
    }

    /// Runs the given `nft` binary: for images where it is not on `PATH`.
    pub fn with_nft(nft: impl Into<String>) -> Forwarder {
        Forwarder {
            command: vec![nft.into()],
            netns: None,
            timeout: NFT_TIMEOUT,
        }
    }

    /// Runs `ip netns exec NETNS nft`: the lab and the tests, where each node is a
    /// network namespace.
    pub fn in_netns(netns: &str) -> Forwarder {
        Forwarder {
            command: ["ip", "netns", "exec", netns, "nft"]
                .map(String::from)
                .to_vec(),
            netns: Some(netns.to_string()),
            timeout: NFT_TIMEOUT,
        }
    }

    /// The same, killing an nft run that takes longer than `timeout`.
    pub fn with_timeout(self, timeout: Duration) -> Forwarder {
        Forwarder { timeout, ..self }
    }

    /// Start of day: deletes the table if present and creates it empty, so rules a
    /// crashed predecessor left behind never linger.
    pub fn reset(&self) -> Result<(), ForwardingError> {
        let mut batch = Batch::new();
        batch.add(table());
        batch.delete(table());
        batch.add(table());
        self.run_batch(&batch.to_nftables(), "resetting table inet ferrolb")
    }

    /// Makes the table hold exactly `rules`, in one atomic nft batch (it applies whole
    /// or not at all). Idempotent: when the table already holds exactly this, nothing
    /// is written (counters survive) and `false` is returned; `true` means rewritten.
    ///
    /// Rules are validated first (matching families, no two targets for one VIP port),
    /// and on error nothing is touched. Order of `rules` and exact duplicates do not
    /// matter. Anything else found in the table, such as leftovers of a crash, is
    /// replaced.
    pub fn apply(&self, rules: &[ForwardRule]) -> Result<bool, ForwardingError> {
        let rules = normalize(rules)?;
        let wanted = TableState::expected(&rules);
        if let Ok(Some(state)) = self.state()
            && state == wanted
        {
            return Ok(false);
        }
        let action = format!(
            "applying {} forwarding rule(s) to table inet ferrolb",
            rules.len()
        );
        self.run_batch(&build_batch(&rules), &action)?;
        Ok(true)
    }

    /// The forwarding rules the table holds now (those of its `prerouting` chain, in
    /// table order), parsed back from `nft -j list table inet ferrolb`. No table means
    /// no rules.
    pub fn current(&self) -> Result<Vec<ForwardRule>, ForwardingError> {
        Ok(self
            .state()?
            .and_then(|mut state| state.rules.remove(CHAINS[0].0))
            .unwrap_or_default()
            .into_iter()
            .filter_map(|listed| match listed {
                Listed::Forward(rule) => Some(rule),
                Listed::Drop(_) => None,
            })
            .collect())
    }

    /// Shutdown: deletes the table (succeeds when there is none).
    pub fn remove(&self) -> Result<(), ForwardingError> {
        let mut batch = Batch::new();
        // Adding first makes the delete succeed when the table is already gone.
        batch.add(table());
        batch.delete(table());
        self.run_batch(&batch.to_nftables(), "deleting table inet ferrolb")
    }

    /// Lists only our table; `None` when it does not exist.
    fn state(&self) -> Result<Option<TableState>, ForwardingError> {
        let args = ["-j", "list", "table", "inet", TABLE];
        let action = "listing table inet ferrolb";
        let stdout = match self.run(&args, None, action) {
            Ok(stdout) => stdout,
            // nft's own report of ENOENT; `ip netns exec` failures read differently.
            Err(ForwardingError::NftFailed { stderr, .. })
                if stderr
                    .trim_start()
                    .starts_with("Error: No such file or directory") =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        let listing: Nftables =
            serde_json::from_str(&stdout).map_err(|source| ForwardingError::BadOutput {
                command: self.describe(&args),
                source,
            })?;
        TableState::parse(&listing).map(Some)
    }

    fn run_batch(&self, batch: &Nftables, action: &str) -> Result<(), ForwardingError> {
        let json = serde_json::to_string(batch).map_err(|source| ForwardingError::BadOutput {
            command: self.describe(&["-j", "-f", "-"]),
            source,
        })?;
        self.run(&["-j", "-f", "-"], Some(&json), action).map(drop)
    }

    fn describe(&self, args: &[&str]) -> String {
        let mut words: Vec<&str> = self.command.iter().map(String::as_str).collect();
        words.extend_from_slice(args);
        words.join(" ")
    }

    /// Runs nft with `args`, feeding `stdin`; returns stdout, or an error carrying
    /// nft's stderr and what was being attempted.
    fn run(
        &self,
        args: &[&str],
        stdin: Option<&str>,
        action: &str,
    ) -> Result<String, ForwardingError> {
        let command = self.describe(args);
        let mut child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| match (source.kind(), &self.netns) {
                (io::ErrorKind::NotFound, None) => ForwardingError::NftNotInstalled {
                    action: action.to_string(),
                    command: command.clone(),
                },
                (io::ErrorKind::NotFound, Some(netns)) => ForwardingError::IpNotInstalled {
                    action: action.to_string(),
                    netns: netns.clone(),
                },
                _ => ForwardingError::Spawn {
                    action: action.to_string(),
                    command: command.clone(),
                    source,
                },
            })?;
        let spawn_error = |source| ForwardingError::Spawn {
            action: action.to_string(),
            command: command.clone(),
            source,
        };
        // The input is written, and the child waited for, on threads of their own, so
        // that a wedged nft (one that neither reads nor exits) is killed after
        // NFT_TIMEOUT instead of blocking the speaker. A failed write (the child exited
        // early, e.g. `ip netns exec` into a missing namespace) is reported after the
        // exit status, which carries the reason on stderr.
        let writer = match (stdin, child.stdin.take()) {
            (Some(input), Some(mut pipe)) => {
                let input = input.to_string();
                Some(std::thread::spawn(move || pipe.write_all(input.as_bytes())))
            }
            _ => None,
        };
        let pid = child.id();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(child.wait_with_output());
        });
        let started = Instant::now();
        let output = match finished.recv_timeout(self.timeout) {
            Ok(output) => output.map_err(spawn_error)?,
            Err(_) => {
                // Not reaped yet (its waiter is still blocked on it), so the pid is
                // still this child's.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = finished.recv();
                return Err(ForwardingError::TimedOut {
                    action: action.to_string(),
                    command,
                    timeout: started.elapsed(),
                });
            }
        };
        let write_result = writer.map_or(Ok(()), |w| {
            w.join()
                .unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked")))
        });
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if !output.status.success() {
            if self.netns.is_some() && stderr.starts_with("exec of \"nft\" failed") {
                return Err(ForwardingError::NftNotInstalled {
                    action: action.to_string(),
                    command,
                });
            }
            return Err(ForwardingError::NftFailed {
                action: action.to_string(),
                command,
                status: output.status.to_string(),
                stderr,
            });
        }
        write_result.map_err(spawn_error)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// Validates and orders rules: families must match, exact duplicates collapse, and
/// one VIP port cannot go to two targets.
fn normalize(rules: &[ForwardRule]) -> Result<Vec<ForwardRule>, ForwardingError> {
    let mut by_key: BTreeMap<(IpAddr, u16, Protocol), ForwardRule> = BTreeMap::new();
    for rule in rules {
        if rule.vip.is_ipv4() != rule.node_ip.is_ipv4() {
            return Err(ForwardingError::FamilyMismatch {
                rule: Box::new(rule.clone()),
            });
        }
        match by_key.get(&rule.key()) {
            Some(first) if first != rule => {
                return Err(ForwardingError::Conflict {
                    first: Box::new(first.clone()),
                    second: Box::new(rule.clone()),
                });
            }
            _ => {
                by_key.insert(rule.key(), rule.clone());
            }
        }
    }
    Ok(by_key.into_values().collect())
}

fn table() -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::INet,
        name: TABLE.into(),
        handle: None,
    })
}

/// The whole table, from scratch: `add` + `delete` clears whatever was there (even
/// objects of a crashed or older speaker), then everything is recreated. nft runs
/// the batch as one transaction.
fn build_batch(rules: &[ForwardRule]) -> Nftables<'static> {
    let mut batch = Batch::new();
    batch.add(table());
    batch.delete(table());
    batch.add(table());
    if !rules.is_empty() {
        for (name, hook) in CHAINS {
            batch.add(NfListObject::Chain(Chain {
                family: NfFamily::INet,
                table: TABLE.into(),
                name: name.into(),
                _type: Some(NfChainType::NAT),
                hook: Some(hook),
                prio: Some(PRIORITY),
                policy: Some(NfChainPolicy::Accept),
                ..Chain::default()
            }));
            for rule in rules {
                batch.add(NfListObject::Rule(Rule {
                    family: NfFamily::INet,
                    table: TABLE.into(),
                    chain: name.into(),
                    expr: rule_statements(rule).into(),
                    comment: Some(rule.comment().into()),
                    ..Rule::default()
                }));
                if !rule.sources.is_empty() {
                    batch.add(NfListObject::Rule(Rule {
                        family: NfFamily::INet,
                        table: TABLE.into(),
                        chain: name.into(),
                        expr: drop_statements(rule).into(),
                        comment: Some(format!("{} source ranges", rule.comment()).into()),
                        ..Rule::default()
                    }));
                }
            }
        }
    }
    batch.to_nftables()
}

fn ip_protocol(addr: IpAddr) -> &'static str {
    if addr.is_ipv4() { "ip" } else { "ip6" }
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn equals(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

/// `ip daddr VIP tcp dport PORT`.
fn destination(rule: &ForwardRule) -> [Statement<'static>; 2] {
    [
        equals(
            payload(ip_protocol(rule.vip), "daddr"),
            Expression::String(rule.vip.to_string().into()),
        ),
        equals(
            payload(rule.protocol.as_str(), "dport"),
            Expression::Number(rule.port.into()),
        ),
    ]
}

/// `ip daddr VIP tcp dport PORT counter drop`: after the forward of a Service with
/// source ranges, what came from elsewhere.
fn drop_statements(rule: &ForwardRule) -> Vec<Statement<'static>> {
    let mut statements = destination(rule).to_vec();
    statements.push(Statement::Counter(Counter::Anonymous(Some(
        AnonymousCounter::default(),
    ))));
    statements.push(Statement::Drop(Some(nftables::stmt::Drop {})));
    statements
}

/// `ip daddr VIP tcp dport PORT [ip saddr { RANGES }] counter dnat ip to NODEIP:NODEPORT`.
fn rule_statements(rule: &ForwardRule) -> Vec<Statement<'static>> {
    let mut statements = destination(rule).to_vec();
    if !rule.sources.is_empty() {
        let items = rule
            .sources
            .iter()
            .map(|(a, b)| {
                let element = match prefix_len(*a, *b) {
                    Some(_) if a == b => Expression::String(a.to_string().into()),
                    Some(len) => {
                        Expression::Named(NamedExpression::Prefix(nftables::expr::Prefix {
                            addr: Box::new(Expression::String(a.to_string().into())),
                            len: len.into(),
                        }))
                    }
                    None => Expression::Range(Box::new(nftables::expr::Range {
                        range: [
                            Expression::String(a.to_string().into()),
                            Expression::String(b.to_string().into()),
                        ],
                    })),
                };
                nftables::expr::SetItem::Element(element)
            })
            .collect();
        statements.push(equals(
            payload(ip_protocol(rule.vip), "saddr"),
            Expression::Named(NamedExpression::Set(items)),
        ));
    }
    statements.extend([
        Statement::Counter(Counter::Anonymous(Some(AnonymousCounter::default()))),
        Statement::DNAT(Some(NAT {
            addr: Some(Expression::String(rule.node_ip.to_string().into())),
            family: Some(if rule.node_ip.is_ipv4() {
                NATFamily::IP
            } else {
                NATFamily::IP6
            }),
            port: Some(Expression::Number(rule.node_port.into())),
            flags: None,
        })),
    ]);
    statements
}

/// A chain's identity and hook, as listed.
#[derive(Debug, PartialEq, Eq)]
struct ChainSpec {
    name: String,
    kind: Option<NfChainType>,
    hook: Option<NfHook>,
    prio: Option<i32>,
}

/// The parts of the table that matter, as comparable data.
#[derive(Debug, PartialEq, Eq)]
struct TableState {
    /// Sorted by name.
    chains: Vec<ChainSpec>,
    /// Rules per chain, in table order.
    rules: BTreeMap<String, Vec<Listed>>,
}

impl TableState {
    /// What [`build_batch`] produces for `rules`.
    fn expected(rules: &[ForwardRule]) -> TableState {
        let mut state = TableState {
            chains: Vec::new(),
            rules: BTreeMap::new(),
        };
        if !rules.is_empty() {
            for (name, hook) in CHAINS {
                state.chains.push(ChainSpec {
                    name: name.to_string(),
                    kind: Some(NfChainType::NAT),
                    hook: Some(hook),
                    prio: Some(PRIORITY),
                });
                let listed = rules
                    .iter()
                    .flat_map(|r| {
                        let drop = (!r.sources.is_empty()).then(|| Listed::Drop(r.key()));
                        std::iter::once(Listed::Forward(r.clone())).chain(drop)
                    })
                    .collect();
                state.rules.insert(name.to_string(), listed);
            }
        }
        state.chains.sort_by(|a, b| a.name.cmp(&b.name));
        state
    }

    /// Reads a `nft -j list table inet ferrolb` listing. Every rule must be one
    /// [`build_batch`] writes; anything else is reported, not skipped.
    fn parse(listing: &Nftables) -> Result<TableState, ForwardingError> {
        let mut state = TableState {
            chains: Vec::new(),
            rules: BTreeMap::new(),
        };
        for object in listing.objects.iter() {
            match object {
                NfObject::ListObject(NfListObject::Chain(chain)) => state.chains.push(ChainSpec {
                    name: chain.name.to_string(),
                    kind: chain._type,
                    hook: chain.hook,
                    prio: chain.prio,
                }),
                NfObject::ListObject(NfListObject::Rule(rule)) => {
                    let parsed =
                        parse_rule(&rule.expr).ok_or_else(|| ForwardingError::UnexpectedRule {
                            chain: rule.chain.to_string(),
                            rule: serde_json::to_string(&rule.expr)
                                .unwrap_or_else(|e| format!("(unprintable: {e})")),
                        })?;
                    state
                        .rules
                        .entry(rule.chain.to_string())
                        .or_default()
                        .push(parsed);
                }
                _ => {}
            }
        }
        state.chains.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(state)
    }
}

/// One rule of ours, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Listed {
    Forward(ForwardRule),
    /// The drop after a forward with source ranges.
    Drop((IpAddr, u16, Protocol)),
}

/// Inverse of [`rule_statements`] and [`drop_statements`]; counters are ignored (they
/// only count).
fn parse_rule(statements: &[Statement]) -> Option<Listed> {
    let significant: Vec<&Statement> = statements
        .iter()
        .filter(|s| !matches!(s, Statement::Counter(_)))
        .collect();
    let (daddr, dport, rest) = match significant.as_slice() {
        [Statement::Match(daddr), Statement::Match(dport), rest @ ..] => (daddr, dport, rest),
        _ => return None,
    };
    let (ip_proto, vip) = match_payload(daddr, "daddr")?;
    let vip: IpAddr = string(vip)?.parse().ok()?;
    if ip_proto != ip_protocol(vip) {
        return None;
    }
    let (l4_proto, port) = match_payload(dport, "dport")?;
    let protocol = match l4_proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    let port = number(port)?;
    let (sources, nat) = match rest {
        [Statement::Drop(_)] => return Some(Listed::Drop((vip, port, protocol))),
        [Statement::DNAT(Some(nat))] => (Vec::new(), nat),
        [Statement::Match(saddr), Statement::DNAT(Some(nat))] => {
            let (proto, set) = match_payload(saddr, "saddr")?;
            if proto != ip_protocol(vip) {
                return None;
            }
            (parse_sources(vip, set)?, nat)
        }
        _ => return None,
    };
    let node_ip: IpAddr = string(nat.addr.as_ref()?)?.parse().ok()?;
    let family_matches = matches!(
        (nat.family?, node_ip),
        (NATFamily::IP, IpAddr::V4(_)) | (NATFamily::IP6, IpAddr::V6(_))
    );
    if !family_matches || nat.flags.as_ref().is_some_and(|f| !f.is_empty()) {
        return None;
    }
    Some(Listed::Forward(ForwardRule {
        vip,
        port,
        protocol,
        node_ip,
        node_port: number(nat.port.as_ref()?)?,
        sources,
    }))
}

/// A listed set of source addresses (single addresses, prefixes and ranges, as nft
/// prints them after merging) back to the merged ranges of [`source_ranges`].
fn parse_sources(vip: IpAddr, set: &Expression) -> Option<Vec<(IpAddr, IpAddr)>> {
    let items: Vec<&Expression> = match set {
        Expression::Named(NamedExpression::Set(items)) => items
            .iter()
            .map(|i| match i {
                nftables::expr::SetItem::Element(e) => Some(e),
                _ => None,
            })
            .collect::<Option<_>>()?,
        // One element may be listed without braces.
        single => vec![single],
    };
    let address = |e: &Expression| -> Option<IpAddr> {
        let ip: IpAddr = string(e)?.parse().ok()?;
        (ip.is_ipv4() == vip.is_ipv4()).then_some(ip)
    };
    let mut intervals = Vec::new();
    for item in items {
        let (a, b) = match item {
            Expression::Named(NamedExpression::Prefix(p)) => {
                let net =
                    ipnetwork::IpNetwork::new(address(&p.addr)?, u8::try_from(p.len).ok()?).ok()?;
                (net.network(), net.broadcast_or_last())
            }
            Expression::Range(r) => (address(&r.range[0])?, address(&r.range[1])?),
            other => {
                let ip = address(other)?;
                (ip, ip)
            }
        };
        intervals.push((to_u128(a), to_u128(b)));
    }
    Some(
        merge(intervals)
            .into_iter()
            .map(|(a, b)| (from_u128(vip, a), from_u128(vip, b)))
            .collect(),
    )
}

/// `PROTOCOL FIELD == right` → (PROTOCOL, right).
fn match_payload<'m>(m: &'m Match, field: &str) -> Option<(&'m str, &'m Expression<'m>)> {
    let Expression::Named(NamedExpression::Payload(Payload::PayloadField(payload))) = &m.left
    else {
        return None;
    };
    (m.op == Operator::EQ && payload.field == field).then_some((&*payload.protocol, &m.right))
}

fn string<'e>(expression: &'e Expression) -> Option<&'e str> {
    match expression {
        Expression::String(s) => Some(match s {
            Cow::Borrowed(s) => s,
            Cow::Owned(s) => s.as_str(),
        }),
        _ => None,
    }
}

fn number(expression: &Expression) -> Option<u16> {
    match expression {
        Expression::Number(n) => u16::try_from(*n).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        vip: &str,
        port: u16,
        protocol: Protocol,
        node_ip: &str,
        node_port: u16,
    ) -> ForwardRule {
        ForwardRule {
            vip: vip.parse().unwrap(),
            port,
            protocol,
            node_ip: node_ip.parse().unwrap(),
            node_port,
            sources: vec![],
        }
    }

    #[test]
    fn mismatched_families_are_rejected_naming_the_rule() {
        let bad = rule("192.0.2.200", 80, Protocol::Tcp, "2001:db8::2", 30080);
        let err = normalize(&[bad]).unwrap_err();
        assert!(matches!(err, ForwardingError::FamilyMismatch { .. }));
        let message = err.to_string();
        assert!(
            message.contains("tcp 192.0.2.200:80 -> [2001:db8::2]:30080"),
            "{message}"
        );
    }

    #[test]
    fn one_vip_port_with_two_targets_is_a_conflict() {
        let a = rule("192.0.2.200", 80, Protocol::Tcp, "192.0.2.2", 30080);
        let b = rule("192.0.2.200", 80, Protocol::Tcp, "192.0.2.3", 30080);
        let udp = rule("192.0.2.200", 80, Protocol::Udp, "192.0.2.3", 30080);
        assert!(matches!(
            normalize(&[a.clone(), b]),
            Err(ForwardingError::Conflict { .. })
        ));
        // Same port over another protocol is a different rule.
        assert_eq!(normalize(&[a, udp]).unwrap().len(), 2);
    }

    #[test]
    fn order_and_exact_duplicates_do_not_matter() {
        let a = rule("192.0.2.200", 80, Protocol::Tcp, "192.0.2.2", 30080);
        let b = rule("2001:db8::200", 53, Protocol::Udp, "2001:db8::2", 30053);
        assert_eq!(
            normalize(&[a.clone(), b.clone(), a.clone()]).unwrap(),
            normalize(&[b, a]).unwrap()
        );
    }

    /// What we write and what nft lists back share one JSON schema, so our own batch
    /// must parse back to the same rules.
    #[test]
    fn written_rules_parse_back() {
        let limited = ForwardRule {
            sources: source_ranges(
                "192.0.2.201".parse().unwrap(),
                &[
                    "10.0.0.0/9".parse().unwrap(),
                    "192.0.2.100/32".parse().unwrap(),
                ],
            ),
            ..rule("192.0.2.201", 443, Protocol::Tcp, "192.0.2.2", 30443)
        };
        let rules = normalize(&[
            rule("192.0.2.200", 80, Protocol::Tcp, "192.0.2.2", 30080),
            rule("2001:db8::200", 53, Protocol::Udp, "2001:db8::2", 30053),
            limited,
        ])
        .unwrap();
        let batch = build_batch(&rules);
        let mut listed = Vec::new();
        for object in batch.objects.iter() {
            if let NfObject::CmdObject(nftables::schema::NfCmd::Add(NfListObject::Rule(r))) = object
                && r.chain == CHAINS[0].0
            {
                listed.push(parse_rule(&r.expr).unwrap());
            }
        }
        assert_eq!(listed, TableState::expected(&rules).rules[CHAINS[0].0]);
    }

    /// A listing as nft 1.0.6 prints it (IPv6 compressed, counters with values).
    #[test]
    fn parses_nft_listing() {
        let listing = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}}, {"table": {"family": "inet", "name": "ferrolb", "handle": 1}}, {"chain": {"family": "inet", "table": "ferrolb", "name": "prerouting", "handle": 1, "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}}, {"rule": {"family": "inet", "table": "ferrolb", "chain": "prerouting", "handle": 2, "comment": "x", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "daddr"}}, "right": "2001:db8::200"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 53}}, {"counter": {"packets": 7, "bytes": 420}}, {"dnat": {"family": "ip6", "addr": "2001:db8::2", "port": 30053}}]}}]}"#;
        let state = TableState::parse(&serde_json::from_str(listing).unwrap()).unwrap();
        assert_eq!(
            state.rules["prerouting"],
            vec![Listed::Forward(rule(
                "2001:db8::200",
                53,
                Protocol::Udp,
                "2001:db8::2",
                30053
            ))]
        );
        assert_eq!(
            state.chains,
            vec![ChainSpec {
                name: "prerouting".to_string(),
                kind: Some(NfChainType::NAT),
                hook: Some(NfHook::Prerouting),
                prio: Some(-100),
            }]
        );
    }

    /// nft merges adjacent ranges and prints prefixes, ranges and single addresses as it
    /// likes (here 10.0.0.0/9 + 10.128.0.0/9 became 10.0.0.0/8, as nft 1.0.6 lists
    /// them); the listing still reads as the ranges written, so nothing is rewritten.
    #[test]
    fn source_ranges_read_back_as_written_whatever_nft_merged() {
        let listing = r#"{"nftables": [{"rule": {"family": "inet", "table": "ferrolb", "chain": "prerouting", "handle": 3, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "192.0.2.200"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}, {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": {"set": [{"prefix": {"addr": "10.0.0.0", "len": 8}}, {"range": ["192.0.2.5", "192.0.2.9"]}, "192.0.2.100"]}}}, {"counter": {"packets": 0, "bytes": 0}}, {"dnat": {"family": "ip", "addr": "192.0.2.2", "port": 30080}}]}}, {"rule": {"family": "inet", "table": "ferrolb", "chain": "prerouting", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "192.0.2.200"}}, {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 80}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}]}"#;
        let state = TableState::parse(&serde_json::from_str(listing).unwrap()).unwrap();
        let vip: IpAddr = "192.0.2.200".parse().unwrap();
        let nets: Vec<ipnetwork::IpNetwork> = [
            "10.128.0.0/9",
            "10.0.0.0/9",
            "192.0.2.100/32",
            "192.0.2.5/32",
            "192.0.2.6/31",
            "192.0.2.8/31",
            "2001:db8::/32",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
        let written = ForwardRule {
            sources: source_ranges(vip, &nets),
            ..rule("192.0.2.200", 80, Protocol::Tcp, "192.0.2.2", 30080)
        };
        assert_eq!(
            state.rules["prerouting"],
            vec![
                Listed::Forward(written.clone()),
                Listed::Drop((vip, 80, Protocol::Tcp))
            ]
        );
        assert_eq!(
            written.to_string(),
            "tcp 192.0.2.200:80 -> 192.0.2.2:30080 from 10.0.0.0-10.255.255.255, \
             192.0.2.5-192.0.2.9, 192.0.2.100"
        );
    }

    #[test]
    fn foreign_rules_are_reported_not_skipped() {
        let listing = r#"{"nftables": [{"rule": {"family": "inet", "table": "ferrolb", "chain": "prerouting", "handle": 2, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}, {"accept": null}]}}]}"#;
        let err = TableState::parse(&serde_json::from_str(listing).unwrap()).unwrap_err();
        assert!(
            matches!(err, ForwardingError::UnexpectedRule { .. }),
            "{err}"
        );
    }

    /// A wedged nft (here a stand-in that never exits) is killed and reported, and the
    /// speaker's loop goes on.
    #[test]
    fn a_hung_nft_is_killed_after_the_timeout() {
        let dir = std::env::temp_dir().join(format!("ferrolb-hung-nft-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("nft");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let fw =
            Forwarder::with_nft(script.to_str().unwrap()).with_timeout(Duration::from_millis(300));
        let err = fw
            .apply(&[rule("192.0.2.200", 80, Protocol::Tcp, "192.0.2.2", 30080)])
            .unwrap_err();
        assert!(matches!(err, ForwardingError::TimedOut { .. }), "{err}");
        assert!(err.to_string().contains("was killed"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_nft_names_the_debian_package() {
        let err = Forwarder::with_nft("/nonexistent/ferrolb-test/nft")
            .current()
            .unwrap_err();
        assert!(matches!(err, ForwardingError::NftNotInstalled { .. }));
        assert!(err.to_string().contains("nftables"), "{err}");
    }
}
