//! The speaker in cluster mode, end to end: a real API server, the real controller, three
//! speakers in lab node namespaces running as the chart's ServiceAccount (reaching the
//! API server over the lab network), and a client that talks to the VIP. Nodes and Pods
//! are written by the test; Kubernetes makes the EndpointSlices.

mod cluster;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster::eventually;
use cluster::lab::{DEADLINE, VIP_PORT, World, pod};
use ferrolb::lab::measure_tcp_outage;

#[tokio::test]
async fn an_applied_service_answers_from_outside_and_says_which_node_announces_it() {
    let mut w = World::start().await;
    let (vip, node_port) = w.service("web", "").await;
    let owner = w.owner(vip);
    eventually(DEADLINE, "TCP through the VIP", || async {
        w.connects(vip).then_some(())
    })
    .await;
    // DNAT to the owner's own NodePort: its backend takes the connection (accept()
    // follows the kernel's handshake by a few milliseconds).
    eventually(
        DEADLINE,
        &format!("the owner's NodePort {node_port} to accept"),
        || async { (w.backends[owner].accepted() >= 1).then_some(()) },
    )
    .await;
    w.wait_reported("web", vip, owner).await;
    let described = w.cluster.kubectl(&["describe", "svc", "web"]);
    assert!(described.contains("NodeAssigned"), "{described}");
    assert_eq!(w.event_count("web", "NodeAssigned"), 1);
    // The speakers are what they claim on /metrics.
    let body = speaker_get(&w, owner, "/metrics").unwrap();
    assert!(
        body.contains(&format!(
            "ferrolb_speaker_announced{{ip=\"{vip}\",interface=\"eth0\"}} 1"
        )),
        "{body}"
    );
    assert!(
        body.contains("ferrolb_speaker_arp_replies_total{interface=\"eth0\"}"),
        "{body}"
    );
    assert!(body.contains("ferrolb_speaker_members 3"), "{body}");
    assert!(body.contains("ferrolb_speaker_api_connected 1"), "{body}");
    // MetalLB's name for the same, for existing dashboards.
    assert!(
        body.lines().any(|l| l.starts_with(
            "metallb_speaker_announced{service=\"default/web\",protocol=\"layer2\",node=\""
        ) && l.ends_with(&format!(",ip=\"{vip}\"}} 1"))),
        "{body}"
    );
}

/// The whole HTTP answer (status line, headers, body) of node `i`'s speaker to `GET path`
/// on its metrics port, or `None` when it does not answer.
fn speaker_get(w: &World, i: usize, path: &str) -> Option<String> {
    let node = w.lab.node(i);
    let address = SocketAddr::new(node.ipv4().into(), 7474);
    node.in_netns(|| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(address).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").ok()?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).ok()?;
        Some(answer)
    })
    .ok()
    .flatten()
}

/// Whether node `i`'s speaker answers `/readyz` with 200 and a body containing `text`,
/// and `/metrics` with `ferrolb_speaker_api_connected` at `connected`.
fn speaker_says(w: &World, i: usize, text: &str, connected: u8) -> bool {
    let ready = speaker_get(w, i, "/readyz").unwrap_or_default();
    let metrics = speaker_get(w, i, "/metrics").unwrap_or_default();
    ready.lines().next().is_some_and(|l| l.contains(" 200 "))
        && ready.contains(text)
        && metrics.contains(&format!("ferrolb_speaker_api_connected {connected}\n"))
}

#[tokio::test]
async fn killing_the_owners_speaker_fails_over_and_the_report_follows() {
    let mut w = World::start().await;
    let (vip, _) = w.service("web", "").await;
    let owner = w.owner(vip);
    w.wait_reported("web", vip, owner).await;
    let target = SocketAddr::new(vip, VIP_PORT);
    let killed = w.speakers[owner].take().unwrap();
    let outage = measure_tcp_outage(
        w.lab.client(),
        target,
        || killed.kill_hard(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    eprintln!(
        "outage after killing {}'s speaker: {outage:?}",
        w.lab.node(owner).name()
    );
    let new_owner = w.owner(vip);
    assert_ne!(new_owner, owner);
    w.wait_reported("web", vip, new_owner).await;
    eventually(DEADLINE, "a second NodeAssigned", || async {
        (w.event_count("web", "NodeAssigned") == 2).then_some(())
    })
    .await;
}

#[tokio::test]
async fn restarting_the_controller_moves_nothing_and_announces_nothing_again() {
    let mut w = World::start().await;
    let (vip, _) = w.service("web", "").await;
    let owner = w.owner(vip);
    w.wait_reported("web", vip, owner).await;
    let events = w.event_count("web", "NodeAssigned");
    let mut controller = w.controller.take().unwrap();
    controller.kill();
    drop(controller);
    let controller = w.cluster.controller("controller-b", &[]).await;
    controller.wait_ready().await;
    // A later Service shows the new controller has run its start.
    w.cluster.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: later, namespace: default}\n\
         spec: {type: LoadBalancer, ports: [{port: 81, targetPort: 8080}]}\n",
    );
    eventually(DEADLINE, "an IP for the later Service", || async {
        let out = w.cluster.kubectl(&[
            "get",
            "svc",
            "later",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]);
        (!out.is_empty()).then_some(())
    })
    .await;
    let now = w.cluster.kubectl(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.status.loadBalancer.ingress[0].ip}",
    ]);
    assert_eq!(now, vip.to_string());
    assert_eq!(w.owner(vip), owner);
    assert_eq!(w.event_count("web", "NodeAssigned"), events);
}

#[tokio::test]
async fn local_traffic_follows_the_endpoint_slices() {
    let mut w = World::start().await;
    pod(&w.cluster, "web-a", "web", "node1", "10.244.1.5", true);
    let (vip, _) = w.service("web", ", externalTrafficPolicy: Local").await;
    assert_eq!(w.owner(vip), 1);
    w.wait_reported("web", vip, 1).await;
    // The only ready Pod moves to node2 (a new Pod there, the old one not ready).
    pod(&w.cluster, "web-b", "web", "node2", "10.244.2.5", true);
    pod(&w.cluster, "web-a", "web", "node1", "10.244.1.5", false);
    eventually(DEADLINE, "ownership to follow the ready Pod", || async {
        (w.owner(vip) == 2).then_some(())
    })
    .await;
    w.wait_reported("web", vip, 2).await;
}

#[tokio::test]
async fn the_exclusion_label_moves_the_ip_and_its_removal_settles() {
    let mut w = World::start().await;
    let (vip, _) = w.service("web", "").await;
    let owner = w.owner(vip);
    let name = w.lab.node(owner).name().to_string();
    w.cluster.kubectl(&[
        "label",
        "node",
        &name,
        "node.kubernetes.io/exclude-from-external-load-balancers=",
    ]);
    let moved = eventually(DEADLINE, "the IP to leave the excluded node", || async {
        let now = w.owner(vip);
        (now != owner).then_some(now)
    })
    .await;
    w.wait_reported("web", vip, moved).await;
    w.cluster.kubectl(&[
        "label",
        "node",
        &name,
        "node.kubernetes.io/exclude-from-external-load-balancers-",
    ]);
    // Settled: one owner, the same over a few seconds of sampling.
    let settled = eventually(DEADLINE, "the IP to settle", || async {
        let first = w.owner(vip);
        tokio::time::sleep(Duration::from_secs(2)).await;
        (w.owner(vip) == first).then_some(first)
    })
    .await;
    w.wait_reported("web", vip, settled).await;
    assert!(w.connects(vip));
}

#[tokio::test]
async fn deleting_the_service_stops_answers_and_rules_within_a_second() {
    let mut w = World::start().await;
    let (vip, _) = w.service("web", "").await;
    let owner = w.owner(vip);
    eventually(DEADLINE, "TCP through the VIP", || async {
        w.connects(vip).then_some(())
    })
    .await;
    // kubectl returns once the Service is gone: the second starts there.
    w.cluster.kubectl(&["delete", "svc", "web"]);
    let deleted = Instant::now();
    let node = w.lab.node(owner);
    ferrolb::lab::poll_until(Duration::from_secs(1), "answers and rules to stop", || {
        let table = node
            .run("nft", ["list", "table", "inet", "ferrolb"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let silent = w
            .lab
            .client()
            .arping_within(vip, Duration::from_millis(100))
            .is_empty();
        (silent && !table.contains(&vip.to_string())).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    eprintln!(
        "answers and rules gone {:?} after the delete",
        deleted.elapsed()
    );
}

#[tokio::test]
async fn an_api_server_outage_interrupts_no_traffic_and_failover_still_works() {
    let mut w = World::start().await;
    let (vip, _) = w.service("web", "").await;
    let owner = w.owner(vip);
    eventually(DEADLINE, "TCP through the VIP", || async {
        w.connects(vip).then_some(())
    })
    .await;
    let target = SocketAddr::new(vip, VIP_PORT);
    let cluster = &mut w.cluster;
    let stopped = measure_tcp_outage(
        w.lab.client(),
        target,
        || {
            cluster.cp.stop_apiserver();
            std::thread::sleep(Duration::from_secs(3));
            Ok(())
        },
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(stopped.duration, Duration::ZERO, "{stopped:?}");
    // Serving, so still ready (a failing readiness probe would only alarm), and saying
    // it is degraded.
    eventually(DEADLINE, "the owner to say it is degraded", || async {
        speaker_says(
            &w,
            owner,
            "ok, degraded: answering on the last objects seen",
            0,
        )
        .then_some(())
    })
    .await;
    // Still down: a speaker dies, membership alone moves its IP.
    let killed = w.speakers[owner].take().unwrap();
    let outage = measure_tcp_outage(
        w.lab.client(),
        target,
        || killed.kill_hard(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
    eprintln!("failover with the API server down: {outage:?}");
    assert_ne!(w.owner(vip), owner);
    w.cluster.cp.start_apiserver().await.unwrap();
    let new_owner = w.owner(vip);
    w.wait_reported("web", vip, new_owner).await;
    eventually(
        DEADLINE,
        "the new owner to say it is connected again",
        || async { speaker_says(&w, new_owner, "ok\n", 1).then_some(()) },
    )
    .await;
}

/// Issue 21, item 13: Service status is not only the controller's to write. An address
/// written there that lies in no IPAddressPool (here one of the node network's, as an
/// attacker would pick) is never answered for, though an advertisement with no pool
/// named announces every pool; a pool address in the same status is.
#[tokio::test]
async fn a_status_ip_outside_every_pool_is_never_announced() {
    let mut w = World::bare(Default::default()).await;
    for i in 0..3 {
        w.speakers[i] = Some(w.spawn_speaker(i));
    }
    w.cluster.apply(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: lab}\n\
         spec: {addresses: [192.0.2.200-192.0.2.209]}\n---\n\
         apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: lab}\nspec: {}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {type: LoadBalancer, ports: [{port: 80, targetPort: 8080, protocol: TCP}]}\n",
    );
    // No controller runs: the status is exactly what this (privileged) writer puts.
    w.cluster.kubectl(&[
        "patch",
        "svc",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"loadBalancer":{"ingress":[{"ip":"192.0.2.150"},{"ip":"192.0.2.205"}]}}}"#,
    ]);
    let in_pool: std::net::IpAddr = "192.0.2.205".parse().unwrap();
    w.owner(in_pool);
    let client = w.lab.client();
    assert_eq!(
        client.arping_within(
            "192.0.2.150".parse::<std::net::IpAddr>().unwrap(),
            Duration::from_millis(500)
        ),
        Vec::<[u8; 6]>::new(),
        "{}",
        w.logs()
    );
    assert!(
        w.logs().contains(
            "192.0.2.150 in the status of Service \\\"default/web\\\" is in no IPAddressPool; it is not announced"
        ),
        "{}",
        w.logs()
    );
}

/// Another host answers for the VIP (another load balancer's speaker left running in a
/// migration, a host configured with the address): the node elected to announce it holds
/// back, the Service's condition names that host's MAC (not "announced"), with one
/// Warning Event; when the host gives the address up the node takes it within seconds and
/// the condition says so.
#[tokio::test]
async fn another_host_answering_for_the_vip_is_reported_on_the_service_not_fought() {
    let mut w = World::start().await;
    // The pool's first address, which the Service gets, is the client's already.
    w.lab
        .client()
        .run("ip", ["addr", "add", "192.0.2.200/24", "dev", "eth0"])
        .unwrap();
    let (vip, _) = w.service("web", "").await;
    let client = w.lab.client();
    assert_eq!(vip.to_string(), "192.0.2.200");
    let mac = client.mac_string();
    let want = format!("{vip} is answered by another host, MAC {mac}, not by ferrolb: ");
    let shown = eventually(DEADLINE, "the ConflictingResponder condition", || async {
        let now = w.reported("web");
        now.starts_with(&want).then_some(now)
    })
    .await;
    let elected = w
        .lab
        .nodes()
        .iter()
        .position(|n| shown[want.len()..].starts_with(&format!("{}, elected", n.name())))
        .unwrap_or_else(|| panic!("the condition names no node: {shown}"));
    // Not fought: only the other host answers, from any node's view.
    let other = w.lab.node((elected + 1) % 3);
    assert_eq!(
        other.arping_within(vip, Duration::from_millis(300)),
        vec![client.mac()],
        "{}",
        w.logs()
    );
    assert_eq!(w.event_count("web", "ConflictingResponder"), 1);
    // The pool says which of its addresses is taken, and by whom.
    let taken = |w: &World| {
        w.cluster.kubectl(&[
            "get",
            "ipaddresspool",
            "lab",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"AddressesTaken\")].message}",
        ])
    };
    let pool_says = format!(
        "1 address is answered by another host on the network, so ferrolb does not announce it: \
         {vip} (default/web) by MAC {mac}"
    );
    eventually(DEADLINE, "the pool's AddressesTaken condition", || async {
        (taken(&w) == pool_says).then_some(())
    })
    .await;
    let metrics = speaker_get(&w, elected, "/metrics").unwrap();
    assert!(
        !metrics.contains(&format!("ferrolb_speaker_announced{{ip=\"{vip}\"")),
        "{metrics}"
    );

    client
        .run("ip", ["addr", "del", "192.0.2.200/24", "dev", "eth0"])
        .unwrap();
    let released = Instant::now();
    let reported = w.wait_reported("web", vip, elected).await;
    println!(
        "reported \"{reported}\" {} ms after the other host gave the address up",
        released.elapsed().as_millis()
    );
    assert_eq!(w.owner(vip), elected);
    eventually(
        DEADLINE,
        "the pool's AddressesTaken condition to go",
        || async { taken(&w).is_empty().then_some(()) },
    )
    .await;
}

/// A host that starts answering for a VIP ferrolb already announces (a router or
/// keepalived configured with it) is found by the owner's routine check: the Service's
/// condition says two hosts answer and names the other MAC, the metric counts two
/// responders, and ferrolb goes on answering (it was there first). When the host lets
/// go, the condition returns to plain "announced".
#[tokio::test]
async fn a_host_that_starts_answering_for_an_announced_vip_is_found_and_reported() {
    let mut w = World::start().await;
    let (vip, _) = w.service("web", "").await;
    let owner = w.owner(vip);
    w.wait_reported("web", vip, owner).await;
    let client = w.lab.client();
    client
        .run("ip", ["addr", "add", &format!("{vip}/24"), "dev", "eth0"])
        .unwrap();
    let added = Instant::now();
    let want = format!(
        "{vip} is announced by {} on eth0, and another host answers for it too, MAC {}",
        w.lab.node(owner).name(),
        client.mac_string()
    );
    eventually(DEADLINE, "the report of a second responder", || async {
        w.reported("web").starts_with(&want).then_some(())
    })
    .await;
    println!(
        "second responder reported {} ms after it appeared",
        added.elapsed().as_millis()
    );
    assert_eq!(w.event_count("web", "ConflictingResponder"), 1);
    let metrics = speaker_get(&w, owner, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("ferrolb_speaker_vip_responders{{ip=\"{vip}\"}} 2")),
        "{metrics}"
    );
    // Still answering: ferrolb was there first.
    assert!(
        w.lab
            .node((owner + 1) % 3)
            .arping_within(vip, Duration::from_millis(300))
            .contains(&w.lab.node(owner).mac()),
        "{}",
        w.logs()
    );

    client
        .run("ip", ["addr", "del", &format!("{vip}/24"), "dev", "eth0"])
        .unwrap();
    w.wait_reported("web", vip, owner).await;
    let metrics = speaker_get(&w, owner, "/metrics").unwrap();
    assert!(
        metrics.contains(&format!("ferrolb_speaker_vip_responders{{ip=\"{vip}\"}} 1")),
        "{metrics}"
    );
}

/// The names of the NodeAnnouncements in ferrolb's namespace.
fn records(w: &World) -> Vec<String> {
    w.cluster
        .kubectl(&[
            "get",
            "nodeannouncements",
            "-n",
            cluster::NAMESPACE,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Each speaker writes the record of its own node (with a token bound to a Pod on that
/// node, through the chart's policy); one that leaves gracefully deletes its record, and
/// the new owner's record shows on the Service.
#[tokio::test]
async fn a_speaker_that_leaves_deletes_its_record_and_the_new_owner_is_shown() {
    let mut w = World::start().await;
    let (vip, _) = w.service("web", "").await;
    let owner = w.owner(vip);
    w.wait_reported("web", vip, owner).await;
    let all: Vec<String> = w.lab.nodes().iter().map(|n| n.name().to_string()).collect();
    eventually(DEADLINE, "a record per node", || async {
        (records(&w) == all).then_some(())
    })
    .await;
    let owner_record = w.cluster.kubectl(&[
        "get",
        "nodeannouncement",
        "-n",
        cluster::NAMESPACE,
        w.lab.node(owner).name(),
        "-o",
        "jsonpath={.spec.ips[0].ip} {.spec.ips[0].interfaces[0]} {.spec.ips[0].services[0]}",
    ]);
    assert_eq!(owner_record, format!("{vip} eth0 default/web"));

    let leaving = w.speakers[owner].take().unwrap();
    leaving.terminate().unwrap();
    let left = w.lab.node(owner).name().to_string();
    eventually(DEADLINE, "the leaving speaker's record to go", || async {
        (!records(&w).contains(&left)).then_some(())
    })
    .await;
    let new_owner = w.owner(vip);
    assert_ne!(new_owner, owner);
    w.wait_reported("web", vip, new_owner).await;
    eventually(
        DEADLINE,
        "the leaving speaker to log the deletion",
        || async {
            leaving
                .stderr()
                .unwrap_or_default()
                .contains("deleted this node's NodeAnnouncement")
                .then_some(())
        },
    )
    .await;
}
