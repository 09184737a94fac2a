//! A lab wired to a real control plane: three lab nodes that are also Node objects,
//! `ferrolb speaker` in cluster mode on each (the chart's ServiceAccount, with a token
//! bound to a Pod on that node as the kubelet would give it, reaching the API server over
//! the lab network), `ferrolb controller` on the host, a client, and
//! NodePort backends. Shared by the speaker's end-to-end tests and benchmark.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use ferrolb::lab::{GATEWAY_IPV4, Lab, LabProcess, Relay, TcpBackend};
use ferrolb_control_plane::Options;

use super::{Cluster, Controller, NAMESPACE, eventually};

pub const DEADLINE: Duration = Duration::from_secs(20);
pub const API_PORT: u16 = 6443;
pub const VIP_PORT: u16 = 80;

pub struct World {
    pub cluster: Cluster,
    pub lab: Lab,
    pub _relay: Relay,
    pub controller: Option<Controller>,
    pub speakers: Vec<Option<LabProcess>>,
    /// Per node: a kubeconfig with a token of the speaker's ServiceAccount bound to a Pod
    /// on that node.
    pub speaker_kubeconfigs: Vec<PathBuf>,
    pub secret: PathBuf,
    pub backends: Vec<TcpBackend>,
}

impl World {
    pub async fn start() -> World {
        World::start_with(Options::default()).await
    }

    /// With control-plane `options` (the lab's address is added to them).
    /// The control plane with the chart installed, the lab, the relay and the Node
    /// objects; nothing of ferrolb running yet.
    pub async fn bare(mut options: Options) -> World {
        if let Err(missing) = Lab::check_prerequisites() {
            panic!("{missing}");
        }
        options.extra_ips.push(GATEWAY_IPV4.into());
        let cluster = Cluster::start_with(options).await;
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
        let mut speaker_kubeconfigs = Vec::new();
        for node in lab.nodes() {
            let token = speaker_token(&cluster, node.name()).await;
            speaker_kubeconfigs.push(
                cluster
                    .cp
                    .token_kubeconfig(
                        &format!("speaker-{}.kubeconfig", node.name()),
                        &format!("https://{}", relay.address()),
                        &token,
                    )
                    .unwrap(),
            );
        }
        let secret = cluster.cp.dir().join("memberlist-secret");
        std::fs::write(&secret, "lab secret").unwrap();
        World {
            cluster,
            lab,
            _relay: relay,
            controller: None,
            speakers: vec![None, None, None],
            speaker_kubeconfigs,
            secret,
            backends: Vec::new(),
        }
    }

    /// [`World::bare`] with ferrolb's controller and a speaker on every node.
    pub async fn start_with(options: Options) -> World {
        let mut world = World::bare(options).await;
        world.controller = Some(world.cluster.controller("controller-a", &[]).await);
        for i in 0..3 {
            world.speakers[i] = Some(world.spawn_speaker(i));
        }
        world
    }

    pub fn spawn_speaker(&self, i: usize) -> LabProcess {
        let node = self.lab.node(i);
        let mut cmd = node.command(
            env!("CARGO_BIN_EXE_ferrolb"),
            [
                "speaker",
                "--node-name",
                node.name(),
                "--kubeconfig",
                self.speaker_kubeconfigs[i].to_str().unwrap(),
                "--namespace",
                NAMESPACE,
                "--memberlist-secret-file",
                self.secret.to_str().unwrap(),
                "--metrics-address",
                &format!("{}:7474", node.ipv4()),
                "--log-format",
                "json",
            ],
        );
        cmd.env("RUST_LOG", "info");
        node.spawn_command(cmd).unwrap()
    }

    /// A pool of lab addresses announced with NodePort forwarding, and Service `name`
    /// with `spec` extras; returns its VIP and NodePort once assigned.
    pub async fn service(&mut self, name: &str, extra_spec: &str) -> (IpAddr, u16) {
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
    pub fn owner(&self, ip: IpAddr) -> usize {
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
    pub fn reported(&self, name: &str) -> String {
        self.cluster.kubectl(&[
            "get",
            "svc",
            name,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"ferrolb.io/AnnouncedIPv4\")].message}",
        ])
    }

    pub async fn wait_reported(&self, name: &str, vip: IpAddr, node: usize) -> String {
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

    pub fn connects(&self, vip: IpAddr) -> bool {
        let target = SocketAddr::new(vip, VIP_PORT);
        self.lab
            .client()
            .in_netns(|| {
                std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)).is_ok()
            })
            .unwrap_or(false)
    }

    /// LoadBalancer Services bulk-N for N in `from..to`, without NodePorts, each with an
    /// EndpointSlice holding one ready endpoint on one of the nodes in turn, as a real
    /// cluster's Services have (and as MetalLB needs before it announces anything).
    pub async fn create_bulk(&self, from: usize, to: usize, annotations: &[(&str, &str)]) {
        use futures::StreamExt;
        use k8s_openapi::api::core::v1::Service;
        use k8s_openapi::api::discovery::v1::EndpointSlice;
        use kube::Api;
        use kube::api::PostParams;

        let client = self.cluster.client().await;
        let services: Api<Service> = Api::namespaced(client.clone(), "default");
        let slices: Api<EndpointSlice> = Api::namespaced(client, "default");
        let nodes: Vec<(String, String)> = self
            .lab
            .nodes()
            .iter()
            .map(|n| (n.name().to_string(), n.ipv4().to_string()))
            .collect();
        futures::stream::iter(from..to)
            .map(|i| {
                let (services, slices) = (services.clone(), slices.clone());
                let (node, address) = nodes[i % nodes.len()].clone();
                async move {
                    let name = format!("bulk-{i}");
                    let mut svc = super::load_balancer(&name, annotations);
                    svc.spec.as_mut().unwrap().allocate_load_balancer_node_ports = Some(false);
                    services.create(&PostParams::default(), &svc).await.unwrap();
                    let slice: EndpointSlice = serde_json::from_value(serde_json::json!({
                        "metadata": {
                            "name": name,
                            "labels": {"kubernetes.io/service-name": name},
                        },
                        "addressType": "IPv4",
                        "ports": [{"port": 8080, "protocol": "TCP"}],
                        "endpoints": [{
                            "addresses": [address],
                            "conditions": {"ready": true},
                            "nodeName": node,
                        }],
                    }))
                    .unwrap();
                    slices.create(&PostParams::default(), &slice).await.unwrap();
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
    }

    pub fn logs(&self) -> String {
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

    pub fn event_count(&self, name: &str, reason: &str) -> usize {
        self.cluster
            .event_reasons("default", name)
            .iter()
            .filter(|r| *r == reason)
            .count()
    }
}

/// A token of the chart's speaker ServiceAccount bound to a speaker Pod on `node` (the
/// Pod is written here; no kubelet runs it), as the DaemonSet's Pod on that node gets.
pub async fn speaker_token(cluster: &Cluster, node: &str) -> String {
    let pod = format!("ferrolb-speaker-{node}");
    cluster.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {NAMESPACE}}}\n\
         spec: {{nodeName: {node}, serviceAccountName: ferrolb-speaker, \
         containers: [{{name: speaker, image: ferrolb}}]}}\n"
    ));
    cluster
        .cp
        .pod_token(NAMESPACE, "ferrolb-speaker", &pod)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn set_node_status(cluster: &Cluster, node: &str, ip: &str, ready: bool) {
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
pub fn pod(cluster: &Cluster, name: &str, app: &str, node: &str, ip: &str, ready: bool) {
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
