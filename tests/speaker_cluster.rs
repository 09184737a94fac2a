//! The speaker in cluster mode, end to end: a real API server, the real controller, three
//! speakers in lab node namespaces running as the chart's ServiceAccount (reaching the
//! API server over the lab network), and a client that talks to the VIP. Nodes and Pods
//! are written by the test; Kubernetes makes the EndpointSlices.

mod cluster;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use cluster::{Cluster, Controller, NAMESPACE, eventually};
use ferrolb::lab::{GATEWAY_IPV4, Lab, LabProcess, Relay, TcpBackend, measure_tcp_outage};
use ferrolb_control_plane::Options;

const DEADLINE: Duration = Duration::from_secs(20);
const API_PORT: u16 = 6443;
const VIP_PORT: u16 = 80;

struct World {
    cluster: Cluster,
    lab: Lab,
    _relay: Relay,
    controller: Option<Controller>,
    speakers: Vec<Option<LabProcess>>,
    speaker_kubeconfig: PathBuf,
    secret: PathBuf,
    backends: Vec<TcpBackend>,
}

impl World {
    async fn start() -> World {
        if let Err(missing) = Lab::check_prerequisites() {
            panic!("{missing}");
        }
        let cluster = Cluster::start_with(Options {
            extra_ips: vec![GATEWAY_IPV4.into()],
            ..Options::default()
        })
        .await;
        cluster.apply(&cluster.chart("templates/speaker-rbac.yaml"));
        let lab = Lab::new(3).unwrap();
        let relay = lab
            .relay(
                API_PORT,
                ([127, 0, 0, 1], cluster.cp.apiserver_port()).into(),
            )
            .unwrap();
        for node in lab.nodes() {
            cluster.apply(&format!(
                "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, labels: {{kubernetes.io/hostname: {}}}}}\n",
                node.name(),
                node.name()
            ));
            set_node_status(&cluster, node.name(), &node.ipv4().to_string(), true);
        }
        let token = cluster
            .cp
            .token(NAMESPACE, "ferrolb-speaker")
            .await
            .unwrap();
        let speaker_kubeconfig = cluster
            .cp
            .token_kubeconfig(
                "speaker.kubeconfig",
                &format!("https://{}", relay.address()),
                &token,
            )
            .unwrap();
        let secret = cluster.cp.dir().join("memberlist-secret");
        std::fs::write(&secret, "lab secret").unwrap();
        let controller = cluster.controller("controller-a", &[]).await;
        let mut world = World {
            cluster,
            lab,
            _relay: relay,
            controller: Some(controller),
            speakers: Vec::new(),
            speaker_kubeconfig,
            secret,
            backends: Vec::new(),
        };
        for i in 0..3 {
            let s = world.spawn_speaker(i);
            world.speakers.push(Some(s));
        }
        world
    }

    fn spawn_speaker(&self, i: usize) -> LabProcess {
        let node = self.lab.node(i);
        let mut cmd = node.command(
            env!("CARGO_BIN_EXE_ferrolb"),
            [
                "speaker",
                "--node-name",
                node.name(),
                "--kubeconfig",
                self.speaker_kubeconfig.to_str().unwrap(),
                "--memberlist-secret-file",
                self.secret.to_str().unwrap(),
                "--metrics-address",
                &format!("{}:7473", node.ipv4()),
                "--log-format",
                "json",
            ],
        );
        cmd.env("RUST_LOG", "info");
        node.spawn_command(cmd).unwrap()
    }

    /// A pool of lab addresses announced with NodePort forwarding, and Service `name`
    /// with `spec` extras; returns its VIP and NodePort once assigned.
    async fn service(&mut self, name: &str, extra_spec: &str) -> (IpAddr, u16) {
        self.cluster.apply(
            "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: lab}\n\
             spec: {addresses: [192.0.2.200-192.0.2.209]}\n---\n\
             apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: lab}\n\
             spec: {forwarding: nodePort}\n",
        );
        self.cluster.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{type: LoadBalancer, selector: {{app: {name}}}, \
             ports: [{{port: {VIP_PORT}, targetPort: 8080, protocol: TCP}}]{extra_spec}}}\n"
        ));
        let vip = eventually(DEADLINE, "an EXTERNAL-IP", || async {
            let out = self.cluster.kubectl(&[
                "get",
                "svc",
                name,
                "-o",
                "jsonpath={.status.loadBalancer.ingress[0].ip}",
            ]);
            out.parse::<IpAddr>().ok()
        })
        .await;
        let node_port: u16 = self
            .cluster
            .kubectl(&[
                "get",
                "svc",
                name,
                "-o",
                "jsonpath={.spec.ports[0].nodePort}",
            ])
            .parse()
            .unwrap();
        // What kube-proxy would provide on every node: something listening on the
        // node's NodePort.
        for node in self.lab.nodes() {
            let addr = SocketAddr::new(node.ipv4().into(), node_port);
            self.backends.push(node.serve_tcp(addr).unwrap());
        }
        (vip, node_port)
    }

    /// The index of the node whose MAC answers ARP for `ip` (exactly one must).
    fn owner(&self, ip: IpAddr) -> usize {
        let macs = ferrolb::lab::poll_until(DEADLINE, &format!("one answer for {ip}"), || {
            let macs = self.lab.client().arping(ip);
            (macs.len() == 1).then_some(macs)
        })
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.logs()));
        self.lab
            .node_with_mac(macs[0])
            .unwrap_or_else(|| panic!("{ip} answered by a MAC of no node"))
    }

    /// What the Service's condition says about its IPv4 address.
    fn reported(&self, name: &str) -> String {
        self.cluster.kubectl(&[
            "get",
            "svc",
            name,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"ferrolb.io/AnnouncedIPv4\")].message}",
        ])
    }

    async fn wait_reported(&self, name: &str, vip: IpAddr, node: usize) -> String {
        let want = format!(
            "{vip} is announced by {} on eth0",
            self.lab.node(node).name()
        );
        eventually(DEADLINE, &format!("the report '{want}'"), || async {
            let now = self.reported(name);
            (now == want).then_some(now)
        })
        .await
    }

    fn connects(&self, vip: IpAddr) -> bool {
        let target = SocketAddr::new(vip, VIP_PORT);
        self.lab
            .client()
            .in_netns(|| {
                std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_ok()
            })
            .unwrap_or(false)
    }

    fn logs(&self) -> String {
        self.speakers
            .iter()
            .zip(self.lab.nodes())
            .map(|(s, n)| {
                format!(
                    "--- {} ---\n{}",
                    n.name(),
                    s.as_ref()
                        .map(|s| s.stderr().unwrap_or_default())
                        .unwrap_or_default()
                )
            })
            .collect()
    }

    fn event_count(&self, name: &str, reason: &str) -> usize {
        self.cluster
            .event_reasons("default", name)
            .iter()
            .filter(|r| *r == reason)
            .count()
    }
}

fn set_node_status(cluster: &Cluster, node: &str, ip: &str, ready: bool) {
    let status = serde_json::json!({"status": {
        "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": node}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" },
                        "reason": "Test", "message": "written by the test"}],
    }});
    cluster.kubectl(&[
        "patch",
        "node",
        node,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
}

/// A Pod of `app` on `node`, Ready or not, as a kubelet would report it.
fn pod(cluster: &Cluster, name: &str, app: &str, node: &str, ip: &str, ready: bool) {
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, image: c, ports: [{{containerPort: 8080}}]}}]}}\n"
    ));
    let status = serde_json::json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
    }});
    cluster.kubectl(&[
        "patch",
        "pod",
        name,
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ]);
}

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
    let node = w.lab.node(owner);
    let metrics_addr = SocketAddr::new(node.ipv4().into(), 7473);
    let body = node
        .in_netns(|| {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(metrics_addr).ok()?;
            write!(s, "GET /metrics HTTP/1.0\r\n\r\n").ok()?;
            let mut body = String::new();
            s.read_to_string(&mut body).ok()?;
            Some(body)
        })
        .unwrap()
        .unwrap();
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
    let deleted = Instant::now();
    w.cluster.kubectl(&["delete", "svc", "web"]);
    let node = w.lab.node(owner);
    ferrolb::lab::poll_until(Duration::from_secs(5), "answers and rules to stop", || {
        let table = node
            .run("nft", ["list", "table", "inet", "ferrolb"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        (w.lab.client().arping(vip).is_empty() && !table.contains(&vip.to_string())).then_some(())
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
}
