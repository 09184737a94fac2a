//! The speaker's data plane, end to end: the real `ferrolb speaker` binary on three lab
//! nodes in standalone mode, observed from the lab's client with arping, ndisc6, TCP,
//! UDP and raw frames.
//!
//! Needs root, iproute2, nftables, arping and ndisc6 (see `.ci/run`).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use ferrolb::lab::{Lab, poll_until};
use ferrolb_speaker::packet_socket::{ETH_P_ARP, ETH_P_IPV6};
use ferrolb_speaker::{arp, ndp};
use support::*;

#[test]
fn each_vip_is_answered_once_by_its_owner_and_nothing_else_is() {
    let services: String = (0..4)
        .map(|i| service(&format!("svc{i}"), 80, 30080, ""))
        .collect();
    let w = World::start(&services);
    let vips: Vec<IpAddr> = (0..4).flat_map(|i| w.ips_of(&format!("svc{i}"))).collect();
    assert_eq!(
        vips.len(),
        8,
        "4 Services, each with an IPv4 and an IPv6 VIP: {vips:?}"
    );
    for vip in &vips {
        w.wait_answered(*vip);
    }
    let client = w.lab.client();
    for vip in vips.iter().filter(|v| v.is_ipv4()) {
        let (_, owner) = w.owner(*vip);
        assert_eq!(client.arping(*vip), vec![owner.mac()], "arping {vip}");
        assert_eq!(
            arp_replies(client, *vip, Duration::from_millis(300)),
            vec![owner.mac()],
            "exactly one reply for {vip}, from {}",
            owner.name()
        );
    }
    for vip in vips.iter().filter(|v| v.is_ipv6()) {
        let (_, owner) = w.owner(*vip);
        assert_eq!(client.ndisc6(*vip), Some(owner.mac()), "ndisc6 {vip}");
    }
    // In the pool but given to no Service; and outside every pool.
    let unassigned = |prefix: &str| -> IpAddr {
        (0..10)
            .map(|i| format!("{prefix}{}", 200 + i).parse().unwrap())
            .find(|ip| !vips.contains(ip))
            .unwrap()
    };
    for ip in [unassigned("192.0.2."), "192.0.2.150".parse().unwrap()] {
        assert_eq!(
            arp_replies(client, ip, Duration::from_millis(300)),
            Vec::<[u8; 6]>::new(),
            "{ip}"
        );
    }
    assert_eq!(client.ndisc6(unassigned("2001:db8::")), None);
    // The IPs are spread: with 8 VIPs on 3 nodes, more than one node answers.
    let owners: std::collections::BTreeSet<usize> = vips.iter().map(|v| w.owner(*v).0).collect();
    assert!(owners.len() > 1, "all VIPs on one node: {owners:?}");
}

#[test]
fn the_client_learns_the_owner_from_a_gratuitous_arp() {
    if let Err(missing) = Lab::check_prerequisites() {
        panic!("{missing}");
    }
    // Start the speakers only after the client accepts unsolicited ARP, so the entry can
    // only come from the announcement.
    let w = World::start("");
    let client = w.lab.client();
    client
        .run("sysctl", ["-qw", "net.ipv4.conf.eth0.arp_accept=1"])
        .unwrap();
    client.flush_neighbours().unwrap();
    std::fs::write(
        w.dir.path().join("services.yaml"),
        service("web", 80, 30080, ""),
    )
    .unwrap();
    let vip = w.ips_of("web")[0];
    let (_, owner) = w.owner(vip);
    let learned = poll_until(DEADLINE, "the client's neighbour entry for the VIP", || {
        client.neighbour(vip).ok().flatten()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    assert_eq!(learned, owner.mac());
}

#[test]
fn node_port_forwarding_carries_tcp_and_udp_through_the_vip() {
    let w = World::start(&service("web", 80, 30080, ""));
    for vip in w.ips_of("web") {
        w.wait_answered(vip);
        let (_, owner) = w.owner(vip);
        let node_ip: IpAddr = match vip {
            IpAddr::V4(_) => owner.ipv4().into(),
            IpAddr::V6(_) => owner.ipv6().into(),
        };
        // A NodePort backend on the owner: TCP greets, UDP echoes.
        let tcp = owner
            .in_netns(|| TcpListener::bind(SocketAddr::new(node_ip, 30080)))
            .unwrap()
            .unwrap();
        let udp = owner
            .in_netns(|| UdpSocket::bind(SocketAddr::new(node_ip, 30080)))
            .unwrap()
            .unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = tcp.accept().unwrap();
            conn.write_all(b"hello through the VIP").unwrap();
            drop(conn);
            let mut buf = [0u8; 64];
            udp.set_read_timeout(Some(DEADLINE)).unwrap();
            let (n, from) = udp.recv_from(&mut buf).unwrap();
            udp.send_to(&buf[..n], from).unwrap();
        });
        let (greeting, echo) = w
            .lab
            .client()
            .in_netns(move || {
                let mut conn =
                    TcpStream::connect_timeout(&SocketAddr::new(vip, 80), DEADLINE).unwrap();
                conn.set_read_timeout(Some(DEADLINE)).unwrap();
                let mut greeting = String::new();
                conn.read_to_string(&mut greeting).unwrap();
                let any: IpAddr = if vip.is_ipv4() {
                    [0, 0, 0, 0].into()
                } else {
                    [0u16; 8].into()
                };
                let udp = UdpSocket::bind(SocketAddr::new(any, 0)).unwrap();
                udp.set_read_timeout(Some(DEADLINE)).unwrap();
                udp.send_to(b"ping", SocketAddr::new(vip, 80)).unwrap();
                let mut buf = [0u8; 64];
                let (n, from) = udp.recv_from(&mut buf).unwrap();
                assert_eq!(
                    from,
                    SocketAddr::new(vip, 80),
                    "the echo comes back from the VIP"
                );
                (greeting, buf[..n].to_vec())
            })
            .unwrap();
        server.join().unwrap();
        assert_eq!(greeting, "hello through the VIP", "{vip}");
        assert_eq!(echo, b"ping", "{vip}");
        // The owner holds rules, and so does the node a failover would give the VIP
        // to (a takeover then forwards at once); the third node holds none.
        let standby = w.lab.node(w.standby(vip)).name().to_string();
        for node in w.lab.nodes() {
            let rules = nft_table(node);
            let has = rules.contains(&format!("daddr {vip} "));
            let expected = node.name() == owner.name() || node.name() == standby;
            assert_eq!(has, expected, "{}: {rules}", node.name());
        }
    }
}

#[test]
fn removing_a_service_stops_answers_and_rules_within_a_second_and_sigterm_withdraws_all() {
    let both = format!(
        "{}{}",
        service("keep", 80, 30080, ""),
        service("gone", 443, 30443, "")
    );
    let mut w = World::start(&both);
    let gone = w.ips_of("gone");
    let keep = w.ips_of("keep");
    for vip in gone.iter().chain(&keep) {
        w.wait_answered(*vip);
    }
    let (_, gone_owner) = w.owner(gone[0]);
    let gone_owner = gone_owner.clone();
    assert!(nft_table(&gone_owner).contains(&format!("daddr {} ", gone[0])));

    std::fs::write(
        w.dir.path().join("services.yaml"),
        service("keep", 80, 30080, ""),
    )
    .unwrap();
    poll_until(
        Duration::from_secs(1),
        "no answer and no rule for the removed VIP",
        || {
            let silent = arp_replies(w.lab.client(), gone[0], Duration::from_millis(50)).is_empty();
            let ruleless = !nft_table(&gone_owner).contains(&format!("daddr {} ", gone[0]));
            (silent && ruleless).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    assert_eq!(w.lab.client().ndisc6(gone[1]), None);
    assert!(
        !w.lab.client().arping(keep[0]).is_empty(),
        "the other Service keeps working"
    );

    for (speaker, node) in w.speakers.iter_mut().zip(w.lab.nodes()) {
        speaker.terminate().unwrap();
        let status = speaker
            .wait_timeout(DEADLINE)
            .unwrap()
            .expect("the speaker exits on SIGTERM");
        assert!(status.success(), "{}: {status:?}", node.name());
        let tables = node.run("nft", ["list", "tables"]).unwrap();
        assert!(
            !String::from_utf8_lossy(&tables.stdout).contains("ferrolb"),
            "{} keeps a ferrolb table",
            node.name()
        );
        assert!(
            speaker
                .stderr()
                .unwrap()
                .contains("withdrew every announcement")
        );
    }
    assert!(
        w.lab.client().arping(keep[0]).is_empty(),
        "nobody answers after SIGTERM"
    );
}

#[test]
fn an_ip_already_in_use_on_the_segment_is_not_announced_and_the_conflict_is_reported() {
    if let Err(missing) = Lab::check_prerequisites() {
        panic!("{missing}");
    }
    let annotation = "ferrolb.io/loadBalancerIPs: 192.0.2.205";
    let w = World::start("");
    // The client already holds the address, outside ferrolb's control.
    w.lab
        .client()
        .run("ip", ["addr", "add", "192.0.2.205/24", "dev", "eth0"])
        .unwrap();
    std::fs::write(
        w.dir.path().join("services.yaml"),
        service("taken", 80, 30080, annotation),
    )
    .unwrap();
    let vip: IpAddr = "192.0.2.205".parse().unwrap();
    let (owner_index, owner) = w.owner(vip);
    poll_until(DEADLINE, "the conflict in the owner's log", || {
        let log = w.speakers[owner_index].stderr().unwrap_or_default();
        log.lines()
            .any(|l| l.contains("already in use") && l.contains("192.0.2.205"))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    let other = w
        .lab
        .nodes()
        .iter()
        .find(|n| n.name() != owner.name())
        .unwrap();
    assert_eq!(
        arp_replies(other, vip, Duration::from_millis(300)),
        vec![w.lab.client().mac()],
        "only the host that had the address answers"
    );

    // The other host gives the address up (another load balancer's speaker removed in a
    // migration): the owner takes it within seconds, not at its next probe minutes later.
    w.lab
        .client()
        .run("ip", ["addr", "del", "192.0.2.205/24", "dev", "eth0"])
        .unwrap();
    let released = std::time::Instant::now();
    poll_until(
        Duration::from_secs(10),
        "the owner to take the address",
        || (arp_replies(other, vip, Duration::from_millis(200)) == vec![owner.mac()]).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    println!(
        "taken {} ms after the other host gave it up",
        released.elapsed().as_millis()
    );
}

/// A host that answers the RFC 5227 probe late still holds the IP: MetalLB's speaker,
/// busy with the probes of a whole node starting beside it, answers hundreds of
/// milliseconds after the probe's 100 ms wait. The speaker stops answering when the late
/// answer comes, so the segment hears one MAC, not two.
#[test]
fn a_late_answer_to_the_probe_still_keeps_the_speaker_off_the_ip() {
    if let Err(missing) = Lab::check_prerequisites() {
        panic!("{missing}");
    }
    let w = World::start("");
    let client = w.lab.client();
    let vip = std::net::Ipv4Addr::new(192, 0, 2, 205);
    let client_mac = client.mac();
    let index = link_index(client);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The slow host: answers every ARP request for the VIP 400 ms late.
    let slow = {
        let (client, stop) = (client.clone(), stop.clone());
        std::thread::spawn(move || {
            client.in_netns(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let socket = ferrolb_speaker::packet_socket::PacketSocket::open(
                        index,
                        ETH_P_ARP,
                        &ferrolb_speaker::packet_socket::arp_filter(),
                    )
                    .unwrap();
                    let mut buf = vec![0u8; 2048];
                    let mut answered = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let wait = Duration::from_millis(100);
                        let Ok(Ok(n)) = tokio::time::timeout(wait, socket.recv(&mut buf)).await
                        else {
                            continue;
                        };
                        let Ok(p) = arp::parse(&buf[..n]) else {
                            continue;
                        };
                        if p.operation == arp::Operation::Request
                            && p.target_ip == vip
                            && p.sender_mac != client_mac
                        {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                            socket.send(&arp::reply(&p, client_mac, vip)).await.unwrap();
                            answered += 1;
                        }
                    }
                    answered
                })
            })
        })
    };
    std::fs::write(
        w.dir.path().join("services.yaml"),
        service(
            "taken",
            80,
            30080,
            "ferrolb.io/loadBalancerIPs: 192.0.2.205",
        ),
    )
    .unwrap();
    poll_until(DEADLINE, "the late answer in a speaker's log", || {
        w.speakers
            .iter()
            .any(|s| {
                s.stderr()
                    .unwrap_or_default()
                    .lines()
                    .any(|l| l.contains("already in use") && l.contains("192.0.2.205"))
            })
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    // No speaker answers (the slow host ignores its own requests).
    let answers = arp_replies(client, IpAddr::V4(vip), Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = slow.join().unwrap().unwrap();
    assert!(answered > 0);
    assert_eq!(answers, Vec::<[u8; 6]>::new(), "{}", w.logs());
}

#[test]
fn malformed_frames_get_no_reply_and_do_not_hurt_the_speaker() {
    let mut w = World::start(&service("web", 80, 30080, ""));
    let ips = w.ips_of("web");
    let (v4, v6) = (ips[0], ips[1]);
    w.wait_answered(v4);
    w.wait_answered(v6);
    let client = w.lab.client();
    let (IpAddr::V4(v4a), IpAddr::V6(v6a)) = (v4, v6) else {
        unreachable!()
    };
    let good_arp = arp::probe(client.mac(), v4a);
    let mut wrong_hw = good_arp.clone();
    wrong_hw[15] = 6; // hardware type 6 (IEEE 802)
    let mut bad_hlen = good_arp.clone();
    bad_hlen[18] = 7;
    let truncated = good_arp[..30].to_vec();
    let mut garbage_arp = vec![0xa5u8; 60];
    garbage_arp[..6].copy_from_slice(&[0xff; 6]);
    garbage_arp[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    let arp_frames = vec![wrong_hw, bad_hlen, truncated, garbage_arp];
    let replies = frames_answering(
        client,
        &arp_frames,
        Duration::from_millis(300),
        ETH_P_ARP,
        |f| {
            arp::parse(f)
                .ok()
                .filter(|p| p.operation == arp::Operation::Reply)
                .map(|p| p.sender_mac)
        },
    );
    assert_eq!(
        replies,
        Vec::<[u8; 6]>::new(),
        "no reply to a malformed ARP frame"
    );

    let good_ns = ndp::solicitation(v6a, client.mac(), client.ipv6());
    let mut bad_hop = good_ns.clone();
    bad_hop[14 + 7] = 64; // hop limit, not covered by the checksum
    let mut bad_option = good_ns.clone();
    let last = bad_option.len() - 7;
    bad_option[last] = 0; // option length 0
    let mut garbage_v6 = vec![0x5au8; 90];
    garbage_v6[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    garbage_v6[14] = 0x60;
    garbage_v6[20] = 58;
    garbage_v6[54] = 135;
    let replies = frames_answering(
        client,
        &[bad_hop, bad_option, garbage_v6],
        Duration::from_millis(300),
        ETH_P_IPV6,
        |f| match ndp::parse(f) {
            // Answers only: the owner's unsolicited announcements (Solicited = 0) may
            // still be repeating.
            Ok(p)
                if matches!(
                    p.kind,
                    ndp::NdpKind::Advertisement {
                        solicited: true,
                        ..
                    }
                ) =>
            {
                Some(p.eth_source)
            }
            _ => None,
        },
    );
    assert_eq!(
        replies,
        Vec::<[u8; 6]>::new(),
        "no reply to a malformed Neighbor Solicitation"
    );

    for (speaker, node) in w.speakers.iter_mut().zip(w.lab.nodes()) {
        assert!(
            speaker.try_wait().unwrap().is_none(),
            "{} died",
            node.name()
        );
    }
    let (_, owner) = w.owner(v4);
    assert_eq!(
        arp_replies(client, v4, Duration::from_millis(300)),
        vec![owner.mac()],
        "still answering"
    );
    assert_eq!(client.ndisc6(v6), Some(w.owner(v6).1.mac()));
}

/// Issue 21, item 14: a VIP outside the node subnet is announced where the node routes
/// it (eth0, the default route), never on a Pod's veth: a Pod asking for it gets no
/// answer, the node network does.
#[test]
fn a_pod_veth_gets_no_answer_and_the_node_network_does() {
    let w = World::start("");
    let pods: Vec<Pod> = (0..3)
        .map(|i| {
            w.lab
                .node(i)
                .run(
                    "ip",
                    ["route", "add", "default", "via", "192.0.2.1", "dev", "eth0"],
                )
                .unwrap();
            Pod::on(&w.lab, i, "vethpod", "10.244.0.5/24")
        })
        .collect();
    std::fs::write(
        w.dir.path().join("routed.yaml"),
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: routed}\n\
         spec: {addresses: [198.51.100.200/32], autoAssign: false}\n",
    )
    .unwrap();
    std::fs::write(
        w.dir.path().join("services.yaml"),
        service(
            "web",
            80,
            30080,
            "ferrolb.io/loadBalancerIPs: 198.51.100.200",
        ),
    )
    .unwrap();
    let vip: IpAddr = "198.51.100.200".parse().unwrap();
    let (_, owner) = w.owner(vip);
    let client = w.lab.client();
    let answered = poll_until(DEADLINE, "the client's answer for the VIP", || {
        let replies = arp_replies(client, vip, Duration::from_millis(100));
        (!replies.is_empty()).then_some(replies)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    assert_eq!(answered, vec![owner.mac()]);
    for (i, pod) in pods.iter().enumerate() {
        let index = index_in(&pod.netns, "eth0");
        assert_eq!(
            arp_replies_at(&pod.netns, index, pod.mac, vip, Duration::from_millis(300)),
            Vec::<[u8; 6]>::new(),
            "the Pod on node{i} was answered\n{}",
            w.logs()
        );
    }
    assert_eq!(
        arp_replies(client, vip, Duration::from_millis(300)),
        vec![owner.mac()],
        "still answered on the node network"
    );
}

/// An 802.1Q tag in front of an Ethernet frame: TPID 0x8100, then priority 0 and `vid`.
fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&[0x81, 0x00]);
    out.extend_from_slice(&vid.to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// Issue 21, item 15: an ARP request tagged for a VLAN reaches the parent interface
/// (the kernel takes the tag off); it belongs to another broadcast domain and gets no
/// answer, where the same request untagged does.
#[test]
fn vlan_tagged_arp_on_the_parent_is_not_answered() {
    let w = World::start(&service("web", 80, 30080, ""));
    let vip = w.ips_of("web")[0];
    w.wait_answered(vip);
    let (_, owner) = w.owner(vip);
    let client = w.lab.client();
    let IpAddr::V4(v4) = vip else { unreachable!() };
    let request = arp::probe(client.mac(), v4);
    let replies = |frames: &[Vec<u8>]| {
        frames_answering(client, frames, Duration::from_millis(300), ETH_P_ARP, |f| {
            arp::parse(f)
                .ok()
                .filter(|p| p.operation == arp::Operation::Reply && p.sender_ip == v4)
                .map(|p| p.sender_mac)
        })
    };
    assert_eq!(
        replies(&[tagged(&request, 200), tagged(&request, 4094)]),
        Vec::<[u8; 6]>::new(),
        "a request tagged for VLAN 200 or 4094 was answered untagged\n{}",
        w.logs()
    );
    assert_eq!(replies(&[request]), vec![owner.mac()], "untagged: answered");
}

/// A TCP server on `addr` in `host` that greets each connection with `greeting`.
fn greeter(host: &ferrolb::lab::Host, addr: SocketAddr, greeting: &'static str) {
    let listener = host.in_netns(|| TcpListener::bind(addr)).unwrap().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let _ = conn.write_all(greeting.as_bytes());
        }
    });
}

/// Connects from `host` and reads the greeting; None if no connection could be made
/// within `wait`.
fn greeting_from(host: &ferrolb::lab::Host, target: SocketAddr, wait: Duration) -> Option<String> {
    host.in_netns(move || {
        let mut conn = TcpStream::connect_timeout(&target, wait).ok()?;
        conn.set_read_timeout(Some(DEADLINE)).ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).ok()?;
        Some(text)
    })
    .unwrap()
}

/// Issue 21, item 11: `spec.loadBalancerSourceRanges` holds for forwarded traffic. The
/// client at 192.0.2.100 (in the range) reaches the Service; a node of the segment
/// (outside it) is dropped, as kube-proxy drops it.
#[test]
fn forwarding_honours_load_balancer_source_ranges() {
    let w = World::start(
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec:\n  type: LoadBalancer\n  loadBalancerSourceRanges: [192.0.2.100/32, 10.0.0.0/8]\n  \
         ports: [{port: 80, nodePort: 30080, protocol: TCP}]\n",
    );
    let vip = w.ips_of("web")[0];
    w.wait_answered(vip);
    let (_, owner) = w.owner(vip);
    greeter(
        owner,
        SocketAddr::new(owner.ipv4().into(), 30080),
        "the Service",
    );
    let outsider = w
        .lab
        .nodes()
        .iter()
        .find(|n| n.name() != owner.name())
        .unwrap();
    let target = SocketAddr::new(vip, 80);
    assert_eq!(
        greeting_from(w.lab.client(), target, DEADLINE).as_deref(),
        Some("the Service"),
        "inside the range\n{}",
        nft_table(owner)
    );
    assert_eq!(
        greeting_from(outsider, target, Duration::from_secs(1)),
        None,
        "{} ({}) is outside the range\n{}",
        outsider.name(),
        outsider.ipv4(),
        nft_table(owner)
    );
    let table = nft_table(owner);
    assert!(
        table.contains("ip saddr { 10.0.0.0/8, 192.0.2.100 }"),
        "{table}"
    );
}

/// Issue 21, item 11: ferrolb's NAT chains run after kube-proxy's (priority dstnat):
/// where kube-proxy translates a VIP, its translation wins. Here kube-proxy's table is
/// made first, so at one priority ferrolb's later chains would run first and win.
#[test]
fn kube_proxy_s_translation_of_a_vip_wins_over_ferrolb_s() {
    let w = World::start("");
    for node in w.lab.nodes() {
        let rules = format!(
            "table ip kube-proxy-lab {{\n chain nat-prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n  \
             ip daddr 192.0.2.200-192.0.2.209 tcp dport 80 dnat to {}:31000\n }}\n}}\n",
            node.ipv4()
        );
        let mut nft = node.command("nft", ["-f", "-"]);
        nft.stdin(std::process::Stdio::piped());
        let mut child = nft.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "{}", node.name());
        greeter(node, SocketAddr::new(node.ipv4().into(), 30080), "ferrolb");
        greeter(
            node,
            SocketAddr::new(node.ipv4().into(), 31000),
            "kube-proxy",
        );
    }
    std::fs::write(
        w.dir.path().join("services.yaml"),
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec:\n  type: LoadBalancer\n  ports: [{port: 80, nodePort: 30080, protocol: TCP}]\n",
    )
    .unwrap();
    let vip = w.ips_of("web")[0];
    w.wait_answered(vip);
    let (_, owner) = w.owner(vip);
    poll_until(DEADLINE, "ferrolb's forwarding rule", || {
        nft_table(owner)
            .contains(&format!("daddr {vip} "))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    assert_eq!(
        greeting_from(w.lab.client(), SocketAddr::new(vip, 80), DEADLINE).as_deref(),
        Some("kube-proxy"),
        "{}",
        nft_table(owner)
    );
}

/// The value of `series` on the metrics endpoint at `address`, asked from `host`.
fn metric(host: &ferrolb::lab::Host, address: SocketAddr, series: &str) -> Option<f64> {
    let page = host
        .in_netns(move || {
            let mut conn = TcpStream::connect_timeout(&address, DEADLINE).ok()?;
            conn.set_read_timeout(Some(DEADLINE)).ok()?;
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

/// Issue 21 (Low): a host that keeps claiming a VIP (here 200 gratuitous ARPs) is
/// counted every time but logged once per 10 s, so it cannot fill the owner's log.
#[test]
fn conflict_warnings_are_rate_limited_and_counted() {
    let w = World::start_with_metrics(&service("web", 80, 30080, ""));
    let vip = w.ips_of("web")[0];
    w.wait_answered(vip);
    let (owner_index, owner) = w.owner(vip);
    let IpAddr::V4(v4) = vip else { unreachable!() };
    let client = w.lab.client();
    let claims: Vec<Vec<u8>> = (0..200)
        .map(|_| arp::gratuitous(client.mac(), v4))
        .collect();
    frames_answering(client, &claims, Duration::ZERO, ETH_P_ARP, |_| None);
    let metrics = SocketAddr::new(owner.ipv4().into(), 7474);
    poll_until(DEADLINE, "200 conflicts counted", || {
        metric(client, metrics, "ferrolb_speaker_conflicts_total")
            .filter(|n| *n >= 200.0)
            .map(drop)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    let log = w.speakers[owner_index].stderr().unwrap_or_default();
    let warnings = log
        .lines()
        .filter(|l| l.contains("another host claims an IP this node announces"))
        .count();
    assert_eq!(warnings, 1, "{log}");
}

/// Issue 23, item 4: an L2Advertisement sets how its IPs are announced. Its IPs get its
/// count and interval of gratuitous ARPs / unsolicited NAs and its periodic refresh;
/// the IPs of a pool it does not announce keep the speaker's defaults (5, no refresh).
#[test]
fn an_advertisement_s_gratuitous_policy_sets_count_interval_and_refresh() {
    let w = World::start("");
    let tuned = r#"
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata: {name: tuned}
spec:
  addresses: [192.0.2.220-192.0.2.221, "2001:db8::220-2001:db8::221"]
---
apiVersion: ferrolb.io/v1beta1
kind: L2Advertisement
metadata: {name: tuned}
spec:
  ipAddressPools: [tuned]
  gratuitous: {count: 3, intervalMilliseconds: 100, refreshSeconds: 10}
"#;
    let services = format!(
        "{tuned}{}{}",
        service("web", 80, 30080, "ferrolb.io/address-pool: tuned"),
        service("plain", 81, 30081, ""),
    );
    let client = w.lab.client();
    let window = Duration::from_secs(13);
    // What the client hears: every gratuitous ARP and unsolicited NA, by target.
    let heard = std::thread::scope(|scope| {
        let arps = scope.spawn(|| {
            capture_at(client, link_index(client), &[], window, ETH_P_ARP, |f| {
                arp::parse(f)
                    .ok()
                    .filter(|p| p.sender_ip == p.target_ip)
                    .map(|p| (IpAddr::V4(p.sender_ip), p.sender_mac))
            })
        });
        let nas = scope.spawn(|| {
            capture_at(client, link_index(client), &[], window, ETH_P_IPV6, |f| {
                let (p, flags, lladdr) = advertisement(f)?;
                // Unsolicited, to all-nodes, overriding, not from a router.
                assert_eq!(
                    (flags, p.destination),
                    ((false, false, true), ndp::ALL_NODES),
                    "{p:?}"
                );
                Some((IpAddr::V6(p.target), lladdr?))
            })
        });
        // Pools, advertisement and Services land in one step, so no IP is announced
        // before its policy is read.
        let staged = w.dir.path().join(".services.yaml");
        std::fs::write(&staged, &services).unwrap();
        std::fs::rename(&staged, w.dir.path().join("services.yaml")).unwrap();
        let mut heard = arps.join().unwrap();
        heard.extend(nas.join().unwrap());
        heard
    });
    let at = |ip: IpAddr| -> Vec<Duration> {
        let (_, owner) = w.owner(ip);
        heard
            .iter()
            .filter(|(_, (target, mac))| *target == ip && *mac == owner.mac())
            .map(|(t, _)| *t)
            .collect()
    };
    let web = w.ips_of("web");
    let plain = w.ips_of("plain");
    assert_eq!((web.len(), plain.len()), (2, 2), "{web:?} {plain:?}");
    for ip in web {
        let times = at(ip);
        let gaps: Vec<Duration> = times.windows(2).map(|p| p[1] - p[0]).collect();
        println!("{ip}: announced at {times:?}, gaps {gaps:?}");
        assert!(
            times.len() >= 4,
            "{ip}: 3 on taking it, then a refresh: {times:?}\n{}",
            w.logs()
        );
        // The takeover burst: 3, at least the interval apart (timers never fire early).
        assert!(
            gaps[..2].iter().all(|g| *g >= Duration::from_millis(95)),
            "{ip}: {gaps:?}"
        );
        // Then nothing until the refresh, 10 s after the last of them.
        assert!(gaps[2] >= Duration::from_millis(9_900), "{ip}: {gaps:?}");
    }
    for ip in plain {
        let times = at(ip);
        println!("{ip}: announced at {times:?}");
        assert_eq!(
            times.len(),
            5,
            "{ip}: the default, and no refresh: {times:?}\n{}",
            w.logs()
        );
    }
}

/// Issue 23, item 6: IPv6 as the kernel and ndisc6 expect it. A solicitation is answered
/// with Solicited and Override set and Router clear, to the asker; a host that tries to
/// configure the VIP finds it taken (its kernel's duplicate address detection fails), and
/// the speaker keeps it; after a takeover the client's kernel moves its existing entry to
/// the new owner on the unsolicited advertisement alone (Override), asking nothing.
#[test]
fn ipv6_answers_and_takeovers_are_what_kernels_expect() {
    let w = World::start(&service("web", 80, 30080, ""));
    let vip = *w
        .ips_of("web")
        .iter()
        .find(|ip| ip.is_ipv6())
        .expect("an IPv6 VIP");
    let IpAddr::V6(vip6) = vip else {
        unreachable!()
    };
    w.wait_answered(vip);
    let client = w.lab.client();
    let (owner, owner_host) = w.owner(vip);
    let owner_mac = owner_host.mac();

    // ndisc6 resolves it, and the answer carries the flags RFC 4861 §7.2.4 asks.
    assert_eq!(client.ndisc6(vip), Some(owner_mac));
    let ns = ndp::solicitation(vip6, client.mac(), client.ipv6());
    let answers = capture_at(
        client,
        link_index(client),
        &[ns],
        Duration::from_millis(500),
        ETH_P_IPV6,
        |f| {
            let (p, flags, lladdr) = advertisement(f)?;
            (p.target == vip6 && p.destination == client.ipv6()).then_some((
                p.eth_source,
                p.source,
                flags,
                lladdr,
            ))
        },
    );
    let answers: Vec<_> = answers.into_iter().map(|(_, a)| a).collect();
    assert_eq!(
        answers,
        [(owner_mac, vip6, (false, true, true), Some(owner_mac))],
        "one solicited NA from the owner, sourced from the VIP"
    );

    // Nor does anything here pose as a router: rdisc6's solicitation goes unanswered.
    let rdisc6 = client
        .command("rdisc6", ["-1", "-r", "1", "-w", "500", "eth0"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&rdisc6.stdout);
    assert!(
        !rdisc6.status.success() && said.contains("No response."),
        "a Router Advertisement answered, or rdisc6 failed: {said}{}",
        String::from_utf8_lossy(&rdisc6.stderr)
    );

    // A host configuring the VIP: its kernel's DAD probe is answered, so the address
    // fails DAD there, and the speaker goes on answering (a probe does not take an IP).
    let dad_of = |ip: &str| -> String {
        let out = client
            .run("ip", ["-6", "-o", "addr", "show", "dev", "eth0"])
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.contains(&format!(" {ip}/")))
            .unwrap_or_default()
            .to_string()
    };
    let with_prefix = format!("{vip6}/64");
    client
        .run(
            "sysctl",
            [
                "-qw",
                "net.ipv6.conf.eth0.accept_dad=1",
                "net.ipv6.conf.eth0.dad_transmits=1",
            ],
        )
        .unwrap();
    client
        .run("ip", ["-6", "addr", "add", &with_prefix, "dev", "eth0"])
        .unwrap();
    let line = poll_until(DEADLINE, "the client's DAD for the VIP to fail", || {
        Some(dad_of(&vip6.to_string())).filter(|l| l.contains("dadfailed"))
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}\n{}", dad_of(&vip6.to_string()), w.logs()));
    println!("the client's kernel: {line}");
    client
        .run("ip", ["-6", "addr", "del", &with_prefix, "dev", "eth0"])
        .unwrap();
    assert_eq!(
        client.ndisc6(vip),
        Some(owner_mac),
        "the owner keeps the VIP"
    );

    // The client's kernel learns the owner by resolving it (a connection attempt), then
    // follows the takeover with no further question of its own.
    client.flush_neighbours().unwrap();
    let _ = client.in_netns(|| {
        std::net::TcpStream::connect_timeout(&SocketAddr::new(vip, 80), Duration::from_millis(300))
    });
    let learned = poll_until(DEADLINE, "the client's neighbour entry for the VIP", || {
        client.neighbour(vip).ok().flatten()
    })
    .unwrap();
    assert_eq!(learned, owner_mac);
    w.speakers[owner].kill_hard().unwrap();
    let moved = poll_until(
        Duration::from_secs(3),
        "the client's kernel entry to move to another node",
        || {
            let mac = client.neighbour(vip).ok().flatten()?;
            (mac != owner_mac).then_some(mac)
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    let new = w
        .lab
        .nodes()
        .iter()
        .position(|n| n.mac() == moved)
        .expect("a node's MAC");
    assert_ne!(new, owner);
}

/// Issue 23, item 3: kube-proxy in IPVS mode without strictARP, as the kernel sees it: a
/// node holds the VIP on a dummy `kube-ipvs0` with arp_ignore 0, so its kernel answers
/// ARP for it beside the owner. The node's speaker finds that and says what to change;
/// with arp_ignore=1 (what strictARP sets) only the owner answers again.
#[test]
fn a_kernel_answering_for_a_vip_it_holds_on_kube_ipvs0_is_named() {
    let w = World::start_with_metrics(&service("web", 80, 30080, ""));
    let vip = w.ips_of("web")[0];
    w.wait_answered(vip);
    let (owner, _) = w.owner(vip);
    let other = (owner + 1) % 3;
    let node = w.lab.node(other);
    // kube-proxy's is a dummy link; this kernel may lack the dummy driver, and an empty
    // bridge holds an address the same way.
    node.run("ip", ["link", "add", "kube-ipvs0", "type", "bridge"])
        .unwrap();
    node.run(
        "ip",
        ["addr", "add", &format!("{vip}/32"), "dev", "kube-ipvs0"],
    )
    .unwrap();
    node.run("ip", ["link", "set", "kube-ipvs0", "up"]).unwrap();
    let client = w.lab.client();
    let mut macs = arp_replies(client, vip, Duration::from_millis(300));
    macs.sort();
    let mut both = vec![w.lab.node(owner).mac(), node.mac()];
    both.sort();
    assert_eq!(macs, both, "the owner and node{other}'s kernel both answer");
    let said = format!(
        "this node's kernel answers ARP on eth0 for 1 VIP(s) it does not announce ({vip}), because kube-ipvs0 hold(s) them and arp_ignore is 0"
    );
    poll_until(DEADLINE, "node's speaker to name the cause", || {
        w.speakers[other]
            .stderr()
            .ok()
            .filter(|log| log.contains(&said))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    let metrics = SocketAddr::new(node.ipv4().into(), 7474);
    let counted = || metric(client, metrics, "ferrolb_speaker_vips_answered_by_kernel");
    assert_eq!(counted(), Some(1.0));

    // strictARP's setting: only the owner answers.
    node.run("sysctl", ["-qw", "net.ipv4.conf.all.arp_ignore=1"])
        .unwrap();
    assert_eq!(
        arp_replies(client, vip, Duration::from_millis(300)),
        vec![w.lab.node(owner).mac()]
    );
    // Re-evaluated on the next change of links: said to be over.
    node.run("ip", ["link", "del", "kube-ipvs0"]).unwrap();
    poll_until(DEADLINE, "node's speaker to say it is over", || {
        w.speakers[other].stderr().ok().filter(|log| {
            log.contains("this node's kernel no longer answers ARP for VIPs it does not announce")
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    assert_eq!(counted(), Some(0.0));
}

/// A node that owns more IPs than its ARP filter can name one by one gets ranges that
/// cover them, and the kernel runs that program: requests for owned IPs reach the
/// speaker's socket, requests for addresses outside the ranges (a flood aimed at the
/// segment's other hosts, or a scan) are dropped before user space.
#[test]
fn the_kernel_passes_owned_ips_and_drops_the_rest_when_hundreds_are_owned() {
    use ferrolb_speaker::packet_socket::{
        MAX_ARP_FILTER_LEN, PacketSocket, arp_filter_for, covering_ranges,
    };
    use std::net::Ipv4Addr;

    if let Err(missing) = Lab::check_prerequisites() {
        panic!("{missing}");
    }
    let lab = Lab::new(1).unwrap_or_else(|e| panic!("{e:#}"));
    let (node, client) = (lab.node(0), lab.client());
    // 600 IPs, every third address from 10.70.0.0: more ranges than fit one by one.
    let first = u32::from(Ipv4Addr::new(10, 70, 0, 0));
    let owned: Vec<Ipv4Addr> = (0..600).map(|i| Ipv4Addr::from(first + 3 * i)).collect();
    assert!(
        6 + 2 + 1 + 4 * covering_ranges(&owned, usize::MAX).len() > MAX_ARP_FILTER_LEN,
        "the owned IPs must not fit one by one"
    );
    let asked: Vec<Ipv4Addr> = owned
        .iter()
        .step_by(23)
        .chain(owned.last())
        .copied()
        .collect();
    let foreign: Vec<Ipv4Addr> = [
        Ipv4Addr::new(10, 69, 255, 255),
        Ipv4Addr::from(first + 3 * 600),
        Ipv4Addr::new(10, 80, 0, 1),
        Ipv4Addr::new(192, 0, 2, 1),
        Ipv4Addr::new(192, 0, 2, 77),
    ]
    .into();
    let index = link_index(node);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let seen = std::thread::scope(|scope| {
        let listener = scope.spawn(|| {
            node.in_netns(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let socket =
                        PacketSocket::open(index, ETH_P_ARP, &arp_filter_for(&owned)).unwrap();
                    ready_tx.send(()).unwrap();
                    let mut seen = std::collections::BTreeSet::new();
                    let mut buf = vec![0u8; 2048];
                    let end = tokio::time::Instant::now() + DEADLINE;
                    while !asked.iter().all(|ip| seen.contains(ip)) {
                        match tokio::time::timeout_at(end, socket.recv(&mut buf)).await {
                            Ok(Ok(n)) => {
                                if let Ok(p) = arp::parse(&buf[..n]) {
                                    seen.insert(p.target_ip);
                                }
                            }
                            _ => break,
                        }
                    }
                    seen
                })
            })
            .unwrap()
        });
        ready_rx
            .recv_timeout(DEADLINE)
            .expect("the node's socket opens");
        // The foreign requests first: on one path frames keep their order, so by the
        // time the last owned one arrives, any foreign one let through has arrived too.
        let requests: Vec<Vec<u8>> = foreign
            .iter()
            .chain(&asked)
            .map(|ip| arp::probe(client.mac(), *ip))
            .collect();
        capture_at(
            client,
            link_index(client),
            &requests,
            Duration::from_millis(10),
            ETH_P_ARP,
            |_| None::<()>,
        );
        listener.join().unwrap()
    });
    let missing: Vec<_> = asked.iter().filter(|ip| !seen.contains(ip)).collect();
    assert!(
        missing.is_empty(),
        "requests for owned IPs the socket never saw: {missing:?}"
    );
    let passed: Vec<_> = foreign.iter().filter(|ip| seen.contains(ip)).collect();
    assert!(
        passed.is_empty(),
        "foreign requests the kernel let through: {passed:?}"
    );
}

/// Three speakers serving metrics, with `extra` arguments, and a Service's IPv4 VIP
/// answered: the world, the VIP, its owner's index and metrics address. The owner
/// answers ARP in the kernel, or in user space, as `in_kernel` says.
fn answering_world(extra: &[&str], in_kernel: bool) -> (World, IpAddr, usize, SocketAddr) {
    let w = World::start_each(&service("web", 80, 30080, ""), |i| {
        let mut args = vec![
            "--metrics-address".to_string(),
            format!("192.0.2.{}:7474", 10 + i),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    });
    let vip = w.ips_of("web")[0];
    w.wait_answered(vip);
    let (i, owner) = w.owner(vip);
    let metrics = SocketAddr::new(owner.ipv4().into(), 7474);
    let series = "ferrolb_speaker_arp_in_kernel{interface=\"eth0\"}";
    assert_eq!(
        metric(w.lab.client(), metrics, series),
        Some(f64::from(u8::from(in_kernel))),
        "{}",
        w.logs()
    );
    (w, vip, i, metrics)
}

/// Sends `signal` to a lab speaker.
fn signal(speaker: &ferrolb::lab::LabProcess, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(speaker.pid() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
}

/// Issue 24: ARP for announced IPs is answered in the kernel by default, so it goes on
/// while the speaker process is stopped, but only for as long as the speaker's lease
/// on the program lasts. A hung speaker then falls silent as a dead one does, and only
/// the node that took its IP answers.
#[test]
fn the_kernel_answers_for_a_stopped_speaker_only_until_its_lease_runs_out() {
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};
    let (w, vip, i, _) = answering_world(&[], true);
    let owner = w.lab.node(i);
    let client = w.lab.client();
    // Stopped, user space cannot answer; the kernel can. A renewal delayed on a loaded
    // machine can leave less lease than the reply needs, so a few tries.
    let mut answered_while_stopped = false;
    for _ in 0..10 {
        poll_until(DEADLINE, "the owner alone answering", || {
            (w.answering(vip) == vec![i]).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
        signal(&w.speakers[i], SIGSTOP);
        if arp_replies(client, vip, Duration::from_millis(30)) == vec![owner.mac()] {
            answered_while_stopped = true;
            break;
        }
        signal(&w.speakers[i], SIGCONT);
    }
    assert!(
        answered_while_stopped,
        "the stopped owner's kernel never answered"
    );
    // Still stopped: membership gives the IP to another node, and the stopped node's
    // kernel has stopped answering.
    let next = poll_until(DEADLINE, "exactly one other node answering", || {
        match w.answering(vip).as_slice() {
            [one] if *one != i => Some(*one),
            _ => None,
        }
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    for _ in 0..5 {
        assert_eq!(
            w.answering(vip),
            vec![next],
            "the stopped node answers again"
        );
    }
    signal(&w.speakers[i], SIGCONT);
}

/// Without the kernel responder (`--arp-in-kernel=false`, the chart's default) the
/// speaker answers in user space: once, from the owner, and not while it is stopped.
#[test]
fn in_user_space_the_owner_answers_once_and_not_while_stopped() {
    use nix::sys::signal::Signal::{SIGCONT, SIGSTOP};
    let (w, vip, i, metrics) = answering_world(&["--arp-in-kernel=false"], false);
    let owner = w.lab.node(i);
    let client = w.lab.client();
    assert_eq!(
        arp_replies(client, vip, Duration::from_millis(300)),
        vec![owner.mac()]
    );
    signal(&w.speakers[i], SIGSTOP);
    let replies = arp_replies(client, vip, Duration::from_millis(30));
    signal(&w.speakers[i], SIGCONT);
    assert_eq!(replies, Vec::<[u8; 6]>::new(), "answered while stopped");
    poll_until(DEADLINE, "replies counted", || {
        metric(
            client,
            metrics,
            "ferrolb_speaker_arp_replies_total{interface=\"eth0\"}",
        )
        .filter(|n| *n >= 1.0)
    })
    .unwrap();
}
