//! What the lab end-to-end tests share: a lab with a speaker on every node reading one
//! manifest directory, and raw ARP/NDP exchanges from a host.

#![allow(dead_code)] // each test file uses its own part

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ferrolb::lab::{Host, Lab, LabProcess, NETNS_PREFIX, Netns, Origin, poll_until};
use ferrolb_api::manifests::Manifests;
use ferrolb_speaker::election::ClusterView;
use ferrolb_speaker::packet_socket::{ETH_P_ARP, PacketSocket, arp_filter, ndp_filter};
use ferrolb_speaker::{announcements, arp, ndp};

pub const DEADLINE: Duration = Duration::from_secs(5);

pub const POOL: &str = r#"
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab}
spec:
  addresses: [192.0.2.200-192.0.2.209, "2001:db8::200-2001:db8::209"]
---
apiVersion: ferrolb.io/v1beta1
kind: L2Advertisement
metadata: {name: lab}
spec: {forwarding: nodePort}
"#;

pub fn service(name: &str, port: u16, node_port: u16, extra_annotations: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\n  annotations: {{{extra_annotations}}}\n\
         spec:\n  type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n  ports:\n  \
         - {{port: {port}, nodePort: {node_port}, protocol: TCP}}\n  - {{port: {port}, nodePort: {node_port}, protocol: UDP}}\n"
    )
}

/// A lab with a speaker on every node, all reading one manifest directory.
pub struct World {
    pub lab: Lab,
    pub dir: tempfile::TempDir,
    pub speakers: Vec<LabProcess>,
}

impl World {
    pub fn start(services: &str) -> World {
        World::start_each(services, |_| vec![])
    }

    /// Like [`World::start`], each speaker serving /metrics on its node's IPv4, port
    /// 7474.
    pub fn start_with_metrics(services: &str) -> World {
        World::start_each(services, |i| {
            vec![
                "--metrics-address".to_string(),
                format!("192.0.2.{}:7474", 10 + i),
            ]
        })
    }

    /// Like [`World::start`], with extra speaker arguments per node index.
    pub fn start_each(services: &str, extra: impl Fn(usize) -> Vec<String>) -> World {
        if let Err(missing) = Lab::check_prerequisites() {
            panic!("{missing}");
        }
        let lab = Lab::new(3).unwrap_or_else(|e| panic!("{e:#}"));
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("nodes.yaml"), lab.node_manifests()).unwrap();
        std::fs::write(dir.path().join("pool.yaml"), POOL).unwrap();
        std::fs::write(dir.path().join("services.yaml"), services).unwrap();
        let speakers = (0..3)
            .map(|i| World::spawn(&lab, dir.path(), i, &extra(i)))
            .collect();
        World { lab, dir, speakers }
    }

    fn spawn(lab: &Lab, dir: &std::path::Path, i: usize, extra: &[String]) -> LabProcess {
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_ferrolb"));
        let mut args = vec!["--log-format", "json"];
        args.extend(extra.iter().map(String::as_str));
        lab.node(i).spawn_speaker(&binary, dir, &args).unwrap()
    }

    /// Starts node `i`'s speaker again (after it was killed).
    pub fn restart(&mut self, i: usize) {
        self.restart_with(i, &[]);
    }

    /// [`World::restart`] with extra speaker arguments.
    pub fn restart_with(&mut self, i: usize, extra: &[String]) {
        self.speakers[i] = World::spawn(&self.lab, self.dir.path(), i, extra);
    }

    /// The nodes answering ARP for `ip` right now, one entry per reply.
    pub fn answering(&self, ip: IpAddr) -> Vec<usize> {
        self.answering_within(ip, Duration::from_millis(100))
    }

    /// [`World::answering`], waiting `window` for replies.
    pub fn answering_within(&self, ip: IpAddr, window: Duration) -> Vec<usize> {
        arp_replies(self.lab.client(), ip, window)
            .iter()
            .filter_map(|mac| self.lab.node_with_mac(*mac))
            .collect()
    }

    /// Waits until exactly one node answers for `ip`, and returns it.
    pub fn single_owner(&self, ip: IpAddr) -> usize {
        poll_until(
            DEADLINE,
            &format!("exactly one node answering for {ip}"),
            || match self.answering(ip).as_slice() {
                [one] => Some(*one),
                _ => None,
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.logs()))
    }

    pub fn manifests(&self) -> Manifests {
        let mut m = Manifests::default();
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            let errors = m.add_text(&f.display().to_string(), &text);
            assert!(errors.is_empty(), "{errors:?}");
        }
        m
    }

    /// The node the pure election says owns `ip` (the wire must agree with it).
    pub fn owner(&self, ip: IpAddr) -> (usize, &Host) {
        let m = self.manifests();
        let owners: Vec<usize> = (0..3)
            .filter(|&i| {
                announcements::plan_node(&m, self.lab.node(i).name(), &ClusterView::everyone())
                    .announcements
                    .iter()
                    .any(|a| a.ip == ip)
            })
            .collect();
        assert_eq!(owners.len(), 1, "{ip} is owned by nodes {owners:?}");
        (owners[0], self.lab.node(owners[0]))
    }

    /// The node a failover would give `ip` to, were its owner gone (the same pure
    /// election, over the other nodes).
    pub fn standby(&self, ip: IpAddr) -> usize {
        let m = self.manifests();
        let (owner, _) = self.owner(ip);
        let view = ClusterView {
            members: Some(
                (0..3)
                    .filter(|&i| i != owner)
                    .map(|i| {
                        let member = ferrolb_speaker::election::MemberView {
                            settled: true,
                            ..Default::default()
                        };
                        (self.lab.node(i).name().to_string(), member)
                    })
                    .collect(),
            ),
        };
        let next: Vec<usize> = (0..3)
            .filter(|&i| {
                announcements::plan_node(&m, self.lab.node(i).name(), &view)
                    .announcements
                    .iter()
                    .any(|a| a.ip == ip)
            })
            .collect();
        assert_eq!(next.len(), 1, "{ip} would go to nodes {next:?}");
        next[0]
    }

    /// The IPs allocated to a Service, from the same pure code the speakers run.
    pub fn ips_of(&self, name: &str) -> Vec<IpAddr> {
        let m = self.manifests();
        let mut owned: Vec<IpAddr> = (0..3)
            .flat_map(|i| {
                announcements::plan_node(&m, self.lab.node(i).name(), &ClusterView::everyone())
                    .announcements
            })
            .filter(|a| a.services.iter().any(|s| s.name == name))
            .map(|a| a.ip)
            .collect();
        owned.sort();
        owned
    }

    pub fn wait_answered(&self, ip: IpAddr) {
        let client = self.lab.client();
        poll_until(DEADLINE, &format!("an answer for {ip}"), || match ip {
            IpAddr::V4(_) => (!client.arping(ip).is_empty()).then_some(()),
            IpAddr::V6(_) => client.ndisc6(ip).map(drop),
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.logs()));
    }

    pub fn logs(&self) -> String {
        self.speakers
            .iter()
            .zip(self.lab.nodes())
            .map(|(s, n)| format!("--- {} ---\n{}", n.name(), s.stderr().unwrap_or_default()))
            .collect()
    }
}

/// Every ARP reply for `ip` that reaches `host` within `window` after one request
/// (a probe, sender 0.0.0.0) from it: the MAC of each answering host, once per reply.
pub fn arp_replies(host: &Host, ip: IpAddr, window: Duration) -> Vec<[u8; 6]> {
    let IpAddr::V4(v4) = ip else {
        panic!("{ip} is not IPv4")
    };
    let mac = host.mac();
    let request = arp::probe(mac, v4);
    frames_answering(host, &[request], window, ETH_P_ARP, move |frame| {
        arp::parse(frame)
            .ok()
            .filter(|p| p.operation == arp::Operation::Reply && p.sender_ip == v4)
            .map(|p| p.sender_mac)
    })
}

/// Sends `frames` from `host` and collects what `pick` recognises in the frames that
/// arrive within `window`.
pub fn frames_answering(
    host: &Host,
    frames: &[Vec<u8>],
    window: Duration,
    ethertype: u16,
    pick: impl Fn(&[u8]) -> Option<[u8; 6]> + Send + Sync,
) -> Vec<[u8; 6]> {
    frames_answering_at(host, link_index(host), frames, window, ethertype, pick)
}

/// [`frames_answering`] from any namespace, on the interface of index `index` there.
pub fn frames_answering_at(
    origin: &impl Origin,
    index: u32,
    frames: &[Vec<u8>],
    window: Duration,
    ethertype: u16,
    pick: impl Fn(&[u8]) -> Option<[u8; 6]> + Send + Sync,
) -> Vec<[u8; 6]> {
    capture_at(origin, index, frames, window, ethertype, pick)
        .into_iter()
        .map(|(_, mac)| mac)
        .collect()
}

/// Sends `frames` from interface `index` of `origin`'s namespace, then keeps what `pick`
/// makes of each frame arriving within `window`, with the time since the start.
pub fn capture_at<T: Send>(
    origin: &impl Origin,
    index: u32,
    frames: &[Vec<u8>],
    window: Duration,
    ethertype: u16,
    pick: impl Fn(&[u8]) -> Option<T> + Send + Sync,
) -> Vec<(Duration, T)> {
    origin
        .in_netns(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let filter = if ethertype == ETH_P_ARP {
                    arp_filter()
                } else {
                    ndp_filter()
                };
                let socket = PacketSocket::open(index, ethertype, &filter).unwrap();
                let start = tokio::time::Instant::now();
                for f in frames {
                    socket.send(f).await.unwrap();
                }
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 2048];
                let end = start + window;
                while let Ok(Ok(n)) = tokio::time::timeout_at(end, socket.recv(&mut buf)).await {
                    if let Some(t) = pick(&buf[..n]) {
                        seen.push((start.elapsed(), t));
                    }
                }
                seen
            })
        })
        .unwrap()
}

/// (Router, Solicited, Override).
pub type NaFlags = (bool, bool, bool);

/// A Neighbor Advertisement as tests look at it: the packet, its flags and its target
/// link-layer address.
pub fn advertisement(frame: &[u8]) -> Option<(ndp::NdpPacket, NaFlags, Option<[u8; 6]>)> {
    let p = ndp::parse(frame).ok()?;
    match p.kind {
        ndp::NdpKind::Advertisement {
            router,
            solicited,
            override_,
            target_lladdr,
        } => Some((p, (router, solicited, override_), target_lladdr)),
        ndp::NdpKind::Solicitation { .. } => None,
    }
}

/// The ARP replies for `ip` that reach `mac` on interface `index` of `origin` within
/// `window` after one probe sent from there.
pub fn arp_replies_at(
    origin: &impl Origin,
    index: u32,
    mac: [u8; 6],
    ip: IpAddr,
    window: Duration,
) -> Vec<[u8; 6]> {
    let IpAddr::V4(v4) = ip else {
        panic!("{ip} is not IPv4")
    };
    let request = arp::probe(mac, v4);
    frames_answering_at(origin, index, &[request], window, ETH_P_ARP, move |frame| {
        arp::parse(frame)
            .ok()
            .filter(|p| p.operation == arp::Operation::Reply && p.sender_ip == v4)
            .map(|p| p.sender_mac)
    })
}

/// The index of interface `name` in `origin`'s namespace.
pub fn index_in(origin: &impl Origin, name: &str) -> u32 {
    let name = std::ffi::CString::new(name).unwrap();
    let index = origin
        .in_netns(|| unsafe { libc::if_nametoindex(name.as_ptr()) })
        .unwrap();
    assert_ne!(index, 0, "no interface {name:?} in {}", origin.name());
    index
}

/// A Pod on a lab node, as a CNI plugin makes one: a network namespace of its own,
/// joined to the node by a veth whose node end (`ifname`, up, no address) sits among
/// the node's links. Deleted when dropped (and by [`Lab::remove_stale`] after a crash:
/// its name carries the lab's).
pub struct Pod {
    pub netns: Netns,
    name: String,
    pub mac: [u8; 6],
}

impl Pod {
    pub fn on(lab: &Lab, node: usize, ifname: &str, ip: &str) -> Pod {
        let name = format!("{NETNS_PREFIX}{}-pod{node}", lab.id());
        let mac = [0x02, 0, 0, 0xfe, 0, node as u8];
        let pod = Pod {
            netns: Netns::named(&name),
            name: name.clone(),
            mac,
        };
        let run = |args: &[&str]| {
            let status = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(status.success(), "ip {args:?}");
        };
        run(&["netns", "add", &name]);
        let node_ns = lab.node(node).netns().to_string();
        let mac_text = ferrolb_speaker::mac::format(&mac);
        run(&[
            "-n", &node_ns, "link", "add", ifname, "type", "veth", "peer", "name", "eth0",
            "address", &mac_text, "netns", &name,
        ]);
        run(&["-n", &node_ns, "link", "set", ifname, "up"]);
        run(&["-n", &name, "link", "set", "lo", "up"]);
        run(&["-n", &name, "addr", "add", ip, "dev", "eth0"]);
        run(&["-n", &name, "link", "set", "eth0", "up"]);
        pod
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn link_index(host: &Host) -> u32 {
    let out = host.run("cat", ["/sys/class/net/eth0/ifindex"]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

pub fn nft_table(host: &Host) -> String {
    let out = host
        .command("nft", ["list", "table", "inet", "ferrolb"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
