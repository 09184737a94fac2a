//! NodePort forwarding against real kernels: every test works in network namespaces
//! of its own (unique names, removed by a guard even on panic), runs the real `nft`,
//! and the traffic test sends real TCP and UDP over a veth pair.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables).

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferrolb_speaker::forwarding::{ForwardRule, Forwarder, ForwardingError, Protocol};
use nix::sched::{CloneFlags, setns};
use socket2::{Domain, SockRef, Socket, Type};

/// Long enough for any packet on a veth on a loaded machine; only waited out in full
/// where traffic is expected to be dropped.
const NO_ANSWER: Duration = Duration::from_millis(600);
const ANSWER: Duration = Duration::from_secs(5);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique() -> String {
    format!(
        "{}{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command, panicking with its stderr when it fails; returns stdout.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut pipe = child.stdin.take().unwrap();
    if let Some(input) = stdin {
        pipe.write_all(input.as_bytes()).unwrap();
    }
    drop(pipe);
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A network namespace, deleted (with the links inside it) on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(role: &str) -> Netns {
        let name = format!("ferrolb-fw-{role}-{}", unique());
        run("ip", &["netns", "add", &name], None);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all, None)
    }

    /// Plain `nft` in this namespace, as another tool (or a crashed speaker) would.
    fn nft(&self, args: &[&str], stdin: Option<&str>) -> String {
        let mut all = vec!["netns", "exec", &self.name, "nft"];
        all.extend_from_slice(args);
        run("ip", &all, stdin)
    }

    /// Runs `f` on a thread inside this namespace: sockets it creates stay there.
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            setns(&ns, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }

    fn forwarder(&self) -> Forwarder {
        Forwarder::in_netns(&self.name)
    }

    fn tables(&self) -> String {
        self.nft(&["list", "tables"], None)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn rule(vip: &str, port: u16, protocol: Protocol, node_ip: &str, node_port: u16) -> ForwardRule {
    ForwardRule {
        vip: vip.parse().unwrap(),
        port,
        protocol,
        node_ip: node_ip.parse().unwrap(),
        node_port,
        sources: vec![],
    }
}

fn sample_rules() -> Vec<ForwardRule> {
    vec![
        rule("192.0.2.200", 80, Protocol::Tcp, "192.0.2.2", 30080),
        rule("192.0.2.200", 53, Protocol::Udp, "192.0.2.2", 30053),
        rule("2001:db8::200", 80, Protocol::Tcp, "2001:db8::2", 30080),
        rule("2001:db8::200", 53, Protocol::Udp, "2001:db8::2", 30053),
    ]
}

fn sorted(mut rules: Vec<ForwardRule>) -> Vec<ForwardRule> {
    rules.sort();
    rules
}

#[test]
fn apply_is_exact_and_idempotent() {
    let ns = Netns::new("idem");
    let fw = ns.forwarder();
    fw.reset().unwrap();
    assert_eq!(fw.current().unwrap(), vec![]);

    let rules = sample_rules();
    assert!(fw.apply(&rules).unwrap(), "first apply writes");
    assert_eq!(sorted(fw.current().unwrap()), sorted(rules.clone()));

    // Same set again, in another order: nothing is rewritten (rule handles and
    // counters stay as they were).
    let before = ns.nft(&["-a", "list", "table", "inet", "ferrolb"], None);
    let reversed: Vec<_> = rules.iter().rev().cloned().collect();
    assert!(!fw.apply(&reversed).unwrap(), "same rules: no write");
    assert_eq!(
        ns.nft(&["-a", "list", "table", "inet", "ferrolb"], None),
        before
    );

    // A smaller set: the dropped rule is gone, the others stay.
    let smaller = &rules[1..];
    assert!(fw.apply(smaller).unwrap());
    let now = fw.current().unwrap();
    assert_eq!(sorted(now.clone()), sorted(smaller.to_vec()));
    assert!(!now.contains(&rules[0]));
    // Both chains follow: the output chain does not keep the dropped rule either.
    let listing = ns.nft(&["list", "table", "inet", "ferrolb"], None);
    assert!(
        !listing.contains("tcp dport 80 counter packets 0 bytes 0 dnat ip to"),
        "{listing}"
    );
    assert!(
        listing.contains("comment \"ferrolb udp 192.0.2.200:53\""),
        "{listing}"
    );

    // Nothing to forward: no rules, and no chains hooking every packet.
    assert!(fw.apply(&[]).unwrap());
    assert_eq!(fw.current().unwrap(), vec![]);
    let listing = ns.nft(&["list", "table", "inet", "ferrolb"], None);
    assert!(!listing.contains("chain"), "{listing}");
}

/// Source ranges go in as written and read back the same though nft merges them
/// (10.0.0.0/9 and 10.128.0.0/9 are listed as 10.0.0.0/8): applying again writes
/// nothing, and the drop for other sources follows each limited forward.
#[test]
fn source_ranges_are_applied_and_read_back_exactly() {
    let ns = Netns::new("ranges");
    let fw = ns.forwarder();
    fw.reset().unwrap();
    let nets: Vec<ipnetwork::IpNetwork> = ["10.128.0.0/9", "10.0.0.0/9", "192.0.2.100/32"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    let v6: Vec<ipnetwork::IpNetwork> = vec!["2001:db8:1::/48".parse().unwrap()];
    let limited = |mut r: ForwardRule, nets: &[ipnetwork::IpNetwork]| {
        r.sources = ferrolb_speaker::forwarding::source_ranges(r.vip, nets);
        r
    };
    let rules = vec![
        limited(
            rule("192.0.2.200", 80, Protocol::Tcp, "192.0.2.2", 30080),
            &nets,
        ),
        rule("192.0.2.200", 53, Protocol::Udp, "192.0.2.2", 30053),
        limited(
            rule("2001:db8::200", 80, Protocol::Tcp, "2001:db8::2", 30080),
            &v6,
        ),
    ];
    assert!(fw.apply(&rules).unwrap());
    assert_eq!(sorted(fw.current().unwrap()), sorted(rules.clone()));
    assert!(!fw.apply(&rules).unwrap(), "same rules: no write");
    let listing = ns.nft(&["list", "chain", "inet", "ferrolb", "prerouting"], None);
    for want in [
        "priority dstnat + 10;",
        "ip daddr 192.0.2.200 tcp dport 80 ip saddr { 10.0.0.0/8, 192.0.2.100 } counter",
        "ip daddr 192.0.2.200 tcp dport 80 counter packets 0 bytes 0 drop",
        "ip6 daddr 2001:db8::200 tcp dport 80 ip6 saddr 2001:db8:1::/48 counter",
    ] {
        assert!(listing.contains(want), "{want:?} in\n{listing}");
    }
}

#[test]
fn invalid_rules_leave_the_table_untouched() {
    let ns = Netns::new("bad");
    let fw = ns.forwarder();
    fw.reset().unwrap();
    let rules = sample_rules();
    fw.apply(&rules).unwrap();

    let mismatch = rule("192.0.2.201", 443, Protocol::Tcp, "2001:db8::2", 30443);
    let err = fw.apply(&[rules[0].clone(), mismatch]).unwrap_err();
    assert!(
        matches!(err, ForwardingError::FamilyMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("192.0.2.201:443"), "{err}");

    let other_target = rule("192.0.2.200", 80, Protocol::Tcp, "192.0.2.3", 30080);
    let err = fw.apply(&[rules[0].clone(), other_target]).unwrap_err();
    assert!(matches!(err, ForwardingError::Conflict { .. }), "{err}");

    assert_eq!(sorted(fw.current().unwrap()), sorted(rules));
}

#[test]
fn other_tables_are_never_touched() {
    let ns = Netns::new("other");
    // Someone else's table, and a same-named table of another family.
    ns.nft(
        &["-f", "-"],
        Some(
            "table inet other {
               chain input { type filter hook input priority 0; policy accept;
                 tcp dport 22 counter accept comment \"keep me\"
               }
             }
             table ip ferrolb {
               chain pre { type nat hook prerouting priority -100;
                 ip daddr 198.51.100.1 tcp dport 80 dnat to 198.51.100.2:8080
               }
             }",
        ),
    );
    let snapshot = || {
        (
            ns.nft(&["-a", "list", "table", "inet", "other"], None),
            ns.nft(&["-a", "list", "table", "ip", "ferrolb"], None),
        )
    };
    let before = snapshot();

    let fw = ns.forwarder();
    fw.reset().unwrap();
    assert_eq!(snapshot(), before);
    fw.apply(&sample_rules()).unwrap();
    assert_eq!(snapshot(), before);
    fw.apply(&sample_rules()[..1]).unwrap();
    assert_eq!(snapshot(), before);
    fw.remove().unwrap();
    assert_eq!(snapshot(), before);
}

#[test]
fn reset_clears_a_crashed_predecessors_table() {
    let ns = Netns::new("crash");
    // What a killed speaker (perhaps an older version) might have left behind.
    ns.nft(
        &["-f", "-"],
        Some(
            "table inet ferrolb {
               set vips { type ipv4_addr; elements = { 192.0.2.99 } }
               chain stale { type nat hook prerouting priority -100;
                 ip daddr 192.0.2.99 tcp dport 80 dnat ip to 192.0.2.2:31000
                 ip daddr @vips udp dport 53 dnat ip to 192.0.2.2:31053
               }
             }",
        ),
    );
    let fw = ns.forwarder();
    fw.reset().unwrap();

    assert_eq!(fw.current().unwrap(), vec![]);
    let listing = ns.nft(&["list", "table", "inet", "ferrolb"], None);
    for leftover in ["chain", "set", "192.0.2.99", "dnat"] {
        assert!(
            !listing.contains(leftover),
            "{leftover} survived:\n{listing}"
        );
    }
    assert!(ns.tables().contains("table inet ferrolb"));
}

#[test]
fn apply_replaces_leftovers_even_without_reset() {
    let ns = Netns::new("heal");
    ns.nft(
        &["-f", "-"],
        Some(
            "table inet ferrolb {
               chain stale { type nat hook prerouting priority -100;
                 tcp dport 22 accept
               }
             }",
        ),
    );
    let fw = ns.forwarder();
    // The foreign rule is reported, not silently read as forwarding.
    let err = fw.current().unwrap_err();
    assert!(
        matches!(err, ForwardingError::UnexpectedRule { .. }),
        "{err}"
    );

    let rules = sample_rules();
    assert!(fw.apply(&rules).unwrap());
    assert_eq!(sorted(fw.current().unwrap()), sorted(rules));
    let listing = ns.nft(&["list", "table", "inet", "ferrolb"], None);
    assert!(!listing.contains("stale"), "{listing}");
}

#[test]
fn remove_deletes_the_table_and_is_idempotent() {
    let ns = Netns::new("rm");
    let fw = ns.forwarder();
    fw.reset().unwrap();
    fw.apply(&sample_rules()).unwrap();
    assert!(ns.tables().contains("table inet ferrolb"));

    fw.remove().unwrap();
    assert!(!ns.tables().contains("ferrolb"), "{}", ns.tables());
    assert_eq!(fw.current().unwrap(), vec![]);
    // A second shutdown (or one with nothing applied) is not an error.
    fw.remove().unwrap();
}

#[test]
fn nft_failures_say_what_was_attempted() {
    // A namespace that does not exist: `ip netns exec` fails, and the error carries
    // its stderr and the attempted action.
    let fw = Forwarder::in_netns(&format!("ferrolb-fw-absent-{}", unique()));
    let err = fw.reset().unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("resetting table inet ferrolb"),
        "{message}"
    );
    assert!(
        message.contains("Cannot open network namespace"),
        "{message}"
    );
}

/// Client and node namespaces joined by a veth pair; the client sends the VIPs to the
/// node's MAC, as the speaker's ARP/NDP answers would make it.
struct Lab {
    client: Netns,
    node: Netns,
}

const CLIENT_V4: &str = "192.0.2.1";
const NODE_V4: &str = "192.0.2.2";
const VIP_V4: &str = "192.0.2.200";
const CLIENT_V6: &str = "2001:db8::1";
const NODE_V6: &str = "2001:db8::2";
const VIP_V6: &str = "2001:db8::200";

impl Lab {
    fn new() -> Lab {
        let client = Netns::new("cli");
        let node = Netns::new("node");
        let id = unique();
        let (client_if, node_if) = (format!("fwc{id}"), format!("fwn{id}"));
        assert!(node_if.len() <= 15, "interface name {node_if} too long");
        client.ip(&[
            "link", "add", &client_if, "type", "veth", "peer", "name", &node_if, "netns",
            &node.name,
        ]);
        for (ns, link, v4, v6) in [
            (&client, &client_if, CLIENT_V4, CLIENT_V6),
            (&node, &node_if, NODE_V4, NODE_V6),
        ] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", link]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", link, "nodad"]);
            ns.ip(&["link", "set", link, "up"]);
        }
        let link: serde_json::Value =
            serde_json::from_str(&node.ip(&["-j", "link", "show", &node_if])).unwrap();
        let mac = link[0]["address"].as_str().unwrap().to_string();
        for vip in [VIP_V4, VIP_V6] {
            client.ip(&[
                "neigh",
                "replace",
                vip,
                "lladdr",
                &mac,
                "dev",
                &client_if,
                "nud",
                "permanent",
            ]);
        }
        Lab { client, node }
    }
}

/// The node's NodePort servers.
struct Servers {
    tcp: TcpListener,
    udp: UdpSocket,
}

impl Servers {
    fn bind(node: &Netns, ip: &str) -> Servers {
        let ip: IpAddr = ip.parse().unwrap();
        node.enter(move || {
            let tcp = TcpListener::bind((ip, 30080)).unwrap();
            let udp = UdpSocket::bind((ip, 30053)).unwrap();
            // Timeouts make accept/recv give up instead of hanging a failed test.
            SockRef::from(&tcp).set_read_timeout(Some(ANSWER)).unwrap();
            Servers { tcp, udp }
        })
    }
}

fn unspecified(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// Connects from `from` (source port `src_port`, fresh per attempt so no old
/// conntrack entry applies) to `vip:80`. True when the connection reaches the node's
/// listener and carries data both ways; the listener must see the client's own
/// address `expect_peer` (no SNAT).
fn tcp_reaches(
    from: &Netns,
    servers: &Servers,
    vip: &str,
    src_port: u16,
    expect_peer: &str,
) -> bool {
    let dst = SocketAddr::new(vip.parse().unwrap(), 80);
    let socket = from.enter(move || {
        let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::new(unspecified(dst.ip()), src_port).into())
            .unwrap();
        socket
    });
    if socket.connect_timeout(&dst.into(), NO_ANSWER).is_err() {
        return false;
    }
    let mut client: TcpStream = socket.into();
    client.set_read_timeout(Some(ANSWER)).unwrap();
    client.write_all(b"ping").unwrap();
    let (mut conn, peer) = servers
        .tcp
        .accept()
        .expect("connected to the VIP, but the NodePort listener saw nothing");
    assert_eq!(peer.ip(), expect_peer.parse::<IpAddr>().unwrap());
    conn.set_read_timeout(Some(ANSWER)).unwrap();
    let mut buf = [0; 4];
    conn.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    conn.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    &buf == b"pong"
}

/// Sends a datagram from the client to `vip:53`; true when it reaches the node's UDP
/// socket and the echo comes back from `vip:53` (the connected socket only accepts
/// that source).
fn udp_round_trips(lab: &Lab, servers: &Servers, vip: &str, src_port: u16) -> bool {
    let dst = SocketAddr::new(vip.parse().unwrap(), 53);
    let client = lab.client.enter(move || {
        let socket = UdpSocket::bind((unspecified(dst.ip()), src_port)).unwrap();
        socket.connect(dst).unwrap();
        socket
    });
    let payload = format!("datagram from port {src_port}");
    client.send(payload.as_bytes()).unwrap();

    servers.udp.set_read_timeout(Some(NO_ANSWER)).unwrap();
    let mut buf = [0; 64];
    let (n, peer) = match servers.udp.recv_from(&mut buf) {
        Ok(got) => got,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return false,
        Err(e) => panic!("NodePort UDP socket: {e}"),
    };
    assert_eq!(&buf[..n], payload.as_bytes());
    servers.udp.send_to(&buf[..n], peer).unwrap();

    client.set_read_timeout(Some(ANSWER)).unwrap();
    match client.recv(&mut buf) {
        Ok(n) => &buf[..n] == payload.as_bytes(),
        Err(_) => false,
    }
}

#[test]
fn traffic_to_the_vip_reaches_the_node_port() {
    let lab = Lab::new();
    let v4 = Servers::bind(&lab.node, NODE_V4);
    let v6 = Servers::bind(&lab.node, NODE_V6);
    let fw = lab.node.forwarder();
    fw.reset().unwrap();

    let families = [
        (VIP_V4, CLIENT_V4, NODE_V4, &v4),
        (VIP_V6, CLIENT_V6, NODE_V6, &v6),
    ];

    // Before: the node does not forward, so nothing answers on the VIP.
    for (vip, client, _, servers) in families {
        assert!(
            !tcp_reaches(&lab.client, servers, vip, 40001, client),
            "TCP {vip} before apply"
        );
        assert!(
            !udp_round_trips(&lab, servers, vip, 40001),
            "UDP {vip} before apply"
        );
    }

    fw.apply(&sample_rules()).unwrap();
    for (vip, client, node, servers) in families {
        assert!(
            tcp_reaches(&lab.client, servers, vip, 40002, client),
            "TCP {vip}"
        );
        assert!(udp_round_trips(&lab, servers, vip, 40002), "UDP {vip}");
        // The owner node reaches its own VIP too (output chain).
        assert!(
            tcp_reaches(&lab.node, servers, vip, 40003, node),
            "TCP {vip} from the node"
        );
    }

    fw.remove().unwrap();
    for (vip, client, node, servers) in families {
        assert!(
            !tcp_reaches(&lab.client, servers, vip, 40004, client),
            "TCP {vip} after remove"
        );
        assert!(
            !udp_round_trips(&lab, servers, vip, 40004),
            "UDP {vip} after remove"
        );
        assert!(
            !tcp_reaches(&lab.node, servers, vip, 40005, node),
            "TCP {vip} from the node after remove"
        );
    }
}
