//! ferrolb against MetalLB (Layer 2 mode, memberlist), one after the other in one run, on
//! the same machine, control plane, lab, pool, Services and nodes:
//!
//! * time from Service creation to EXTERNAL-IP (median, p99) with 1,000 and 10,000
//!   Services already assigned;
//! * controller resident memory at 10,000 Services, speaker resident memory;
//! * API requests per Service allocated and per minute at rest, per component (from the
//!   API server's audit log);
//! * the outage after killing the owner's speaker (kill -9) and after cutting its link,
//!   median and max of 10 each, at both projects' default settings;
//! * IPs moved by a controller restart with 1,000 Services, 100 of them pending.
//!
//! Each project gets a fresh control plane and lab. MetalLB is built from its Go module
//! (tests/metallb/build) and runs with its CRDs, as cluster-admin (its RBAC is not under
//! test), with fake speaker Pods whose IPs are the nodes' (MetalLB finds its memberlist
//! peers through them). MetalLB leaves forwarding to kube-proxy, which does not run here:
//! every node gets the DNAT kube-proxy would program (VIP:80 to its own NodePort), so
//! traffic follows whichever node answers ARP, exactly as ferrolb's own forwarding does.
//!
//! `cargo bench -p ferrolb --bench versus_metallb`, as root. `FERROLB_BENCH_SERVICES`
//! changes the larger count (default 10,000).

#[path = "../tests/cluster/mod.rs"]
mod cluster;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cluster::lab::{VIP_PORT, World};
use cluster::{Controller, eventually};
use ferrolb::lab::{LabProcess, format_duration, measure_tcp_outage};
use ferrolb_control_plane::Options;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};

const KILLS: usize = 10;
const SAMPLES: usize = 100;
const METALLB_NS: &str = "metallb-system";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Project {
    Ferrolb,
    Metallb,
}

impl Project {
    fn name(self) -> &'static str {
        match self {
            Project::Ferrolb => "ferrolb",
            Project::Metallb => "MetalLB",
        }
    }

    fn controller_user(self) -> &'static str {
        match self {
            Project::Ferrolb => "system:serviceaccount:ferrolb-system:ferrolb-controller",
            Project::Metallb => "system:serviceaccount:metallb-system:controller",
        }
    }

    fn speaker_user(self) -> &'static str {
        match self {
            Project::Ferrolb => "system:serviceaccount:ferrolb-system:ferrolb-speaker",
            Project::Metallb => "system:serviceaccount:metallb-system:speaker",
        }
    }
}

/// A running controller of either project.
enum AnyController {
    Ferrolb(Controller),
    Metallb(std::process::Child),
}

impl AnyController {
    fn pid(&self) -> u32 {
        match self {
            AnyController::Ferrolb(c) => c.pid(),
            AnyController::Metallb(c) => c.id(),
        }
    }
}

impl Drop for AnyController {
    fn drop(&mut self) {
        if let AnyController::Metallb(c) = self {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Default)]
struct Figures {
    kill: Vec<Duration>,
    cut: Vec<Duration>,
    moved_by_restart: usize,
    pending_at_restart: usize,
    latency: BTreeMap<usize, (f64, f64)>,
    writes_per_service: f64,
    controller_rest: usize,
    speaker_rest: usize,
    controller_rss: f64,
    speaker_rss: f64,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let large: usize = std::env::var("FERROLB_BENCH_SERVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let metallb = build_metallb();
    let mut results = Vec::new();
    for project in [Project::Ferrolb, Project::Metallb] {
        eprintln!("== {}", project.name());
        results.push(measure(project, &metallb, large).await);
    }
    let (f, m) = (&results[0], &results[1]);
    let rows: Vec<(String, String, String)> = vec![
        row(
            "failover after kill -9 of the owner's speaker (median / max of 10)",
            spread(&f.kill),
            spread(&m.kill),
        ),
        row(
            "failover after cutting the owner's link (median / max of 10)",
            spread(&f.cut),
            spread(&m.cut),
        ),
        row(
            "creation to EXTERNAL-IP, 1,000 assigned (median / p99)",
            ms(f.latency[&1000]),
            ms(m.latency[&1000]),
        ),
        row(
            &format!("creation to EXTERNAL-IP, {large} assigned (median / p99)"),
            ms(f.latency[&large]),
            ms(m.latency[&large]),
        ),
        row(
            &format!("controller resident memory, {large} Services"),
            mib(f.controller_rss),
            mib(m.controller_rss),
        ),
        row(
            &format!("speaker resident memory, {large} Services"),
            mib(f.speaker_rss),
            mib(m.speaker_rss),
        ),
        row(
            "controller API writes per Service allocated",
            format!("{:.2}", f.writes_per_service),
            format!("{:.2}", m.writes_per_service),
        ),
        row(
            "controller API requests per minute at rest",
            f.controller_rest.to_string(),
            m.controller_rest.to_string(),
        ),
        row(
            "speaker API requests per minute at rest (3 speakers)",
            f.speaker_rest.to_string(),
            m.speaker_rest.to_string(),
        ),
        row(
            "IPs moved by a controller restart (1,000 Services, 100 pending)",
            format!(
                "{} (of {} pending before)",
                f.moved_by_restart, f.pending_at_restart
            ),
            format!(
                "{} (of {} pending before)",
                m.moved_by_restart, m.pending_at_restart
            ),
        ),
    ];
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!(
        "\n{:width$}  {:>22}  {:>22}",
        format!(
            "{} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        "ferrolb",
        "MetalLB 0.15.2"
    );
    for (k, a, b) in rows {
        println!("{k:width$}  {a:>22}  {b:>22}");
    }
}

fn row(k: &str, a: String, b: String) -> (String, String, String) {
    (k.to_string(), a, b)
}

async fn measure(project: Project, metallb: &Path, large: usize) -> Figures {
    let mut fig = Figures::default();
    let mut w = World::bare(Options {
        audit: true,
        ..Options::default()
    })
    .await;
    let mut controller = start(project, &mut w, metallb, "first").await;
    let (vip, _) = web(project, &mut w).await;

    // Failover: kill -9 of the owner's speaker, then its link cut, 10 each.
    for (round, cut) in (0..2 * KILLS).map(|r| (r, r >= KILLS)) {
        let owner = w.owner(vip);
        let node = w.lab.node(owner).clone();
        let target = SocketAddr::new(vip, VIP_PORT);
        let outage = if cut {
            measure_tcp_outage(
                w.lab.client(),
                target,
                || node.set_link(false),
                Duration::from_secs(60),
            )
        } else {
            let killed = w.speakers[owner].take().unwrap();
            measure_tcp_outage(
                w.lab.client(),
                target,
                || killed.kill_hard(),
                Duration::from_secs(60),
            )
        }
        .unwrap_or_else(|e| panic!("{e:#}\n{}", w.logs()));
        eprintln!(
            "{} {} {}: outage {}",
            project.name(),
            if cut { "link cut" } else { "kill" },
            round % KILLS + 1,
            format_duration(outage.duration)
        );
        if cut {
            fig.cut.push(outage.duration);
            node.set_link(true).unwrap();
        } else {
            fig.kill.push(outage.duration);
            w.speakers[owner] = Some(spawn_speaker(project, &w, metallb, owner));
        }
        // Settled again: the first owner answers and carries traffic.
        eventually(
            Duration::from_secs(120),
            "the VIP back on its first owner",
            || async { (w.owner(vip) == owner && w.connects(vip)).then_some(()) },
        )
        .await;
    }

    // 1,000 Services on a pool of 900: 100 stay pending. Restart the controller.
    bulk_pool(project, &w, "198.18.0.0-198.18.3.131");
    create(&w, 0, 1000).await;
    let before = eventually(Duration::from_secs(300), "900 assigned", || async {
        let ips = w.cluster.ips("default").await;
        let n = ips
            .iter()
            .filter(|(k, v)| k.starts_with("bulk-") && !v.is_empty())
            .count();
        (n == 900).then_some(ips)
    })
    .await;
    fig.pending_at_restart = 100;
    drop(controller);
    controller = start_controller(project, &w, metallb, "second").await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = w.cluster.ips("default").await;
    fig.moved_by_restart = before
        .iter()
        .filter(|(k, v)| k.starts_with("bulk-") && !v.is_empty() && after.get(*k) != Some(v))
        .count();
    eprintln!(
        "{}: {} IPs moved by the restart",
        project.name(),
        fig.moved_by_restart
    );

    // Room for everyone; latency at 1,000 and at `large`.
    bulk_pool(project, &w, "198.18.0.0/15");
    wait_assigned(&w, 1000).await;
    fig.latency.insert(1000, latency(&w, "probe-1k").await);
    let writes_before = audit(&w, project.controller_user());
    create(&w, 1000, large).await;
    wait_assigned(&w, large).await;
    let written = writes(&diff(&writes_before, &audit(&w, project.controller_user())));
    fig.writes_per_service = written as f64 / (large - 1000) as f64;
    fig.latency.insert(large, latency(&w, "probe-large").await);
    fig.controller_rss = rss_mib(controller.pid());
    fig.speaker_rss = w
        .speakers
        .iter()
        .flatten()
        .map(|s| rss_mib(s.pid()))
        .fold(0.0, f64::max);

    tokio::time::sleep(Duration::from_secs(10)).await;
    let c0 = audit(&w, project.controller_user());
    let s0 = audit(&w, project.speaker_user());
    tokio::time::sleep(Duration::from_secs(60)).await;
    fig.controller_rest = diff(&c0, &audit(&w, project.controller_user()))
        .values()
        .sum();
    fig.speaker_rest = diff(&s0, &audit(&w, project.speaker_user())).values().sum();
    eprintln!(
        "{} at rest: controller {:?}, speakers {:?}",
        project.name(),
        diff(&c0, &audit(&w, project.controller_user())),
        diff(&s0, &audit(&w, project.speaker_user()))
    );
    drop(controller);
    fig
}

/// The project's controller and speakers, running.
async fn start(project: Project, w: &mut World, metallb: &Path, name: &str) -> AnyController {
    if project == Project::Metallb {
        w.cluster.kubectl(&["create", "namespace", METALLB_NS]);
        w.cluster
            .apply(&std::fs::read_to_string(metallb.join("crds.yaml")).unwrap());
        w.cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/ipaddresspools.metallb.io",
            "crd/l2advertisements.metallb.io",
            "crd/servicel2statuses.metallb.io",
        ]);
        for account in ["controller", "speaker"] {
            w.cluster
                .kubectl(&["create", "serviceaccount", "-n", METALLB_NS, account]);
            w.cluster.kubectl(&[
                "create",
                "clusterrolebinding",
                &format!("metallb-{account}"),
                "--clusterrole=cluster-admin",
                &format!("--serviceaccount={METALLB_NS}:{account}"),
            ]);
        }
        // MetalLB finds memberlist peers through its speaker Pods' IPs (hostNetwork: the
        // nodes' own). No kubelet runs here, so the Pods are written as a kubelet would.
        for node in w.lab.nodes() {
            let name = format!("speaker-{}", node.name());
            w.cluster.apply(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {METALLB_NS}, labels: {{app: metallb, component: speaker}}}}\n\
                 spec: {{nodeName: {}, hostNetwork: true, containers: [{{name: speaker, image: metallb}}]}}\n",
                node.name()
            ));
            let status = serde_json::json!({"status": {"phase": "Running", "podIP": node.ipv4().to_string(),
                "podIPs": [{"ip": node.ipv4().to_string()}], "hostIP": node.ipv4().to_string(),
                "conditions": [{"type": "Ready", "status": "True"}]}});
            w.cluster.kubectl(&[
                "patch",
                "pod",
                &name,
                "-n",
                METALLB_NS,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status.to_string(),
            ]);
        }
        let key = w.cluster.cp.dir().join("metallb-memberlist");
        std::fs::create_dir_all(&key).unwrap();
        std::fs::write(key.join("secretkey"), "lab secret for metallb").unwrap();
        w.cluster.kubectl(&[
            "create",
            "secret",
            "generic",
            "memberlist",
            "-n",
            METALLB_NS,
            &format!("--from-file=secretkey={}", key.join("secretkey").display()),
        ]);
        // The speakers reach the API server over the lab network, as ferrolb's do.
        let token = w.cluster.cp.token(METALLB_NS, "speaker").await.unwrap();
        let server = std::fs::read_to_string(&w.speaker_kubeconfig).unwrap();
        let server: serde_json::Value = serde_json::from_str(&server).unwrap();
        let server = server["clusters"][0]["cluster"]["server"]
            .as_str()
            .unwrap()
            .to_string();
        w.cluster
            .cp
            .token_kubeconfig("metallb-speaker.kubeconfig", &server, &token)
            .unwrap();
    }
    let controller = start_controller(project, w, metallb, name).await;
    for i in 0..3 {
        w.speakers[i] = Some(spawn_speaker(project, w, metallb, i));
    }
    controller
}

async fn start_controller(
    project: Project,
    w: &World,
    metallb: &Path,
    name: &str,
) -> AnyController {
    match project {
        Project::Ferrolb => {
            let c = w.cluster.controller(name, &[]).await;
            c.wait_ready().await;
            AnyController::Ferrolb(c)
        }
        Project::Metallb => {
            let token = w.cluster.cp.token(METALLB_NS, "controller").await.unwrap();
            let kubeconfig = w
                .cluster
                .cp
                .token_kubeconfig(
                    "metallb-controller.kubeconfig",
                    &w.cluster.cp.server(),
                    &token,
                )
                .unwrap();
            let log = std::fs::File::create(
                w.cluster
                    .cp
                    .dir()
                    .join(format!("metallb-controller-{name}.log")),
            )
            .unwrap();
            let child = std::process::Command::new(metallb.join("controller"))
                .args(["--kubeconfig", kubeconfig.to_str().unwrap()])
                .args([
                    "--namespace",
                    METALLB_NS,
                    "--ml-secret-name",
                    "memberlist",
                    "--webhook-mode",
                    "disabled",
                ])
                .args(["--disable-cert-rotation", "--port", "0"])
                .env("METALLB_POD_NAME", name)
                .stdin(std::process::Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            AnyController::Metallb(child)
        }
    }
}

fn spawn_speaker(project: Project, w: &World, metallb: &Path, i: usize) -> LabProcess {
    match project {
        Project::Ferrolb => w.spawn_speaker(i),
        Project::Metallb => {
            let node = w.lab.node(i);
            let kubeconfig = w.cluster.cp.dir().join("metallb-speaker.kubeconfig");
            let key = w.cluster.cp.dir().join("metallb-memberlist");
            let mut cmd = node.command(
                metallb.join("speaker"),
                [
                    "--kubeconfig",
                    kubeconfig.to_str().unwrap(),
                    "--node-name",
                    node.name(),
                    "--namespace",
                    METALLB_NS,
                    "--ml-bindaddr",
                    &node.ipv4().to_string(),
                    "--ml-bindport",
                    "7946",
                    "--ml-labels",
                    "app=metallb,component=speaker",
                    "--ml-secret-key-path",
                    key.to_str().unwrap(),
                    "--port",
                    "0",
                ],
            );
            cmd.env("METALLB_POD_NAME", format!("speaker-{}", node.name()));
            node.spawn_command(cmd).unwrap()
        }
    }
}

/// The pool for the VIP, its advertisement, the Service `web` with a NodePort, a backend
/// on every node's NodePort, and (MetalLB) the DNAT kube-proxy would add.
async fn web(project: Project, w: &mut World) -> (IpAddr, u16) {
    match project {
        Project::Ferrolb => w.service("web", "").await,
        Project::Metallb => {
            w.cluster.apply(
                "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: lab, namespace: metallb-system}\n\
                 spec: {addresses: [192.0.2.200-192.0.2.209]}\n---\n\
                 apiVersion: metallb.io/v1beta1\nkind: L2Advertisement\nmetadata: {name: lab, namespace: metallb-system}\n",
            );
            w.cluster.apply(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
                 spec: {{type: LoadBalancer, selector: {{app: web}}, ports: [{{port: {VIP_PORT}, targetPort: 8080, protocol: TCP}}]}}\n"
            ));
            let vip: IpAddr = eventually(
                Duration::from_secs(60),
                "an EXTERNAL-IP from MetalLB",
                || async {
                    w.cluster
                        .kubectl(&[
                            "get",
                            "svc",
                            "web",
                            "-o",
                            "jsonpath={.status.loadBalancer.ingress[0].ip}",
                        ])
                        .parse()
                        .ok()
                },
            )
            .await;
            let node_port: u16 = w
                .cluster
                .kubectl(&[
                    "get",
                    "svc",
                    "web",
                    "-o",
                    "jsonpath={.spec.ports[0].nodePort}",
                ])
                .parse()
                .unwrap();
            for node in w.lab.nodes() {
                let ip = node.ipv4();
                let rules = format!(
                    "table ip kube_proxy_like {{ chain prerouting {{ type nat hook prerouting priority dstnat; \
                     ip daddr {vip} tcp dport {VIP_PORT} dnat to {ip}:{node_port} }} }}"
                );
                let mut add = node.command("nft", ["-f", "-"]);
                add.stdin(std::process::Stdio::piped());
                let mut child = add.spawn().unwrap();
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(rules.as_bytes())
                    .unwrap();
                assert!(child.wait().unwrap().success());
                w.backends.push(
                    node.serve_tcp(SocketAddr::new(ip.into(), node_port))
                        .unwrap(),
                );
            }
            (vip, node_port)
        }
    }
}

fn bulk_pool(project: Project, w: &World, range: &str) {
    match project {
        Project::Ferrolb => w.cluster.apply(&cluster::pool("bulk", &[range])),
        Project::Metallb => w.cluster.apply(&format!(
            "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: bulk, namespace: metallb-system}}\n\
             spec: {{addresses: [{range}]}}\n"
        )),
    };
}

/// LoadBalancer Services bulk-N for N in `from..to`, without NodePorts.
async fn create(w: &World, from: usize, to: usize) {
    let api: Api<Service> = Api::namespaced(w.cluster.client().await, "default");
    futures::stream::iter(from..to)
        .map(|i| {
            let api = api.clone();
            async move {
                let mut svc = cluster::load_balancer(&format!("bulk-{i}"), &[]);
                svc.spec.as_mut().unwrap().allocate_load_balancer_node_ports = Some(false);
                api.create(&PostParams::default(), &svc).await.unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

async fn wait_assigned(w: &World, count: usize) {
    eventually(
        Duration::from_secs(900),
        &format!("{count} bulk Services assigned"),
        || async {
            let ips = w.cluster.ips("default").await;
            let n = ips
                .iter()
                .filter(|(k, v)| k.starts_with("bulk-") && !v.is_empty())
                .count();
            (n >= count).then_some(())
        },
    )
    .await;
}

/// Creates Services one at a time and times each from the create call to the watch
/// event that shows its IP. (median, p99) in milliseconds.
async fn latency(w: &World, prefix: &str) -> (f64, f64) {
    let client = w.cluster.client().await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let mut events = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let mut samples = Vec::new();
    for i in 0..SAMPLES {
        let name = format!("{prefix}-{i}");
        let mut svc = cluster::load_balancer(&name, &[]);
        svc.spec.as_mut().unwrap().allocate_load_balancer_node_ports = Some(false);
        let started = Instant::now();
        api.create(&PostParams::default(), &svc).await.unwrap();
        loop {
            let svc = tokio::time::timeout(Duration::from_secs(60), events.next())
                .await
                .expect("a status within 60 s")
                .unwrap()
                .unwrap();
            if svc.metadata.name.as_deref() == Some(name.as_str())
                && !ferrolb_controller::reconcile::ingress_ips(&svc).is_empty()
            {
                break;
            }
        }
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    (at(0.5), at(0.99))
}

fn audit(w: &World, user: &str) -> BTreeMap<(String, String), usize> {
    let text = std::fs::read_to_string(w.cluster.cp.audit_log()).unwrap_or_default();
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if e["user"]["username"] != user || e["stage"] != "ResponseComplete" {
            continue;
        }
        let mut resource = e["objectRef"]["resource"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(sub) = e["objectRef"]["subresource"].as_str() {
            resource = format!("{resource}/{sub}");
        }
        *counts
            .entry((e["verb"].as_str().unwrap_or_default().to_string(), resource))
            .or_default() += 1;
    }
    counts
}

fn diff(
    before: &BTreeMap<(String, String), usize>,
    after: &BTreeMap<(String, String), usize>,
) -> BTreeMap<(String, String), usize> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn writes(counts: &BTreeMap<(String, String), usize>) -> usize {
    counts
        .iter()
        .filter(|((verb, _), _)| matches!(verb.as_str(), "create" | "update" | "patch" | "delete"))
        .map(|(_, n)| n)
        .sum()
}

fn build_metallb() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/metallb/build");
    let out = std::process::Command::new("bash")
        .arg(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "tests/metallb/build failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap())
}

fn spread(outages: &[Duration]) -> String {
    let mut sorted = outages.to_vec();
    sorted.sort();
    format!(
        "{} / {}",
        format_duration(sorted[sorted.len() / 2]),
        format_duration(*sorted.last().unwrap())
    )
}

fn ms((median, p99): (f64, f64)) -> String {
    format!("{median:.1} / {p99:.1} ms")
}

fn mib(v: f64) -> String {
    format!("{v:.1} MiB")
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}
