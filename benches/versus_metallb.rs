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
//! Every Service has an EndpointSlice with a ready endpoint, written by hand (no kubelet
//! runs Pods here), since MetalLB announces nothing else.
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
use cluster::{Controller, bench, eventually};
use ferrolb::lab::{LabProcess, format_duration, measure_tcp_outage};
use ferrolb_control_plane::Options;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};

const KILLS: usize = 10;
/// How long after a disruption the VIP may take to return to its first owner.
const NOT_BACK: Duration = Duration::from_secs(60);
/// How long a killed speaker's IP may wait for another node to take it over.
const KILL_TAKEOVER: Duration = Duration::from_secs(60);
const SAMPLES: usize = 100;
/// How long one latency sample may wait for its EXTERNAL-IP.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Timed-out samples after which the rest are not taken (100 × 60 s would be hours).
const GIVE_UP_AFTER: usize = 4;
const METALLB_NS: &str = "metallb-system";
/// Bulk and probe Services take the bulk pool, leaving the lab pool to the VIP (MetalLB's
/// spelling, which ferrolb honours too).
const BULK: &[(&str, &str)] = &[("metallb.io/address-pool", "bulk")];

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

#[derive(Default, Debug)]
struct Figures {
    kill: Vec<Duration>,
    /// After each kill, the time until another node answered ARP (None: not within
    /// [`KILL_TAKEOVER`]).
    kill_takeover: Vec<Option<Duration>>,
    /// Rounds after which the VIP did not return to its first owner within [`NOT_BACK`].
    not_back: usize,
    cut: Vec<Duration>,
    moved_by_restart: usize,
    pending_at_restart: usize,
    latency: BTreeMap<usize, Latency>,
    writes_per_service: f64,
    controller_rest: usize,
    speaker_rest: usize,
    controller_rss: f64,
    speaker_rss: f64,
}

fn main() {
    bench::main(run);
}

async fn run() {
    let large = bench::large_count();
    let metallb = build_metallb();
    let mut results = Vec::new();
    // FERROLB_BENCH_ONLY=metallb (or ferrolb) measures one project, to debug the bench.
    let only = std::env::var("FERROLB_BENCH_ONLY").unwrap_or_default();
    for project in [Project::Ferrolb, Project::Metallb] {
        if !only.is_empty() && !project.name().eq_ignore_ascii_case(&only) {
            results.push(None);
            continue;
        }
        eprintln!("== {}", project.name());
        let figures = measure(project, &metallb, large).await;
        // On record even if the next project's run fails.
        eprintln!("{} figures: {figures:?}", project.name());
        results.push(Some(figures));
    }
    let skipped = Figures::default();
    let (f, m) = (
        results[0].as_ref().unwrap_or(&skipped),
        results[1].as_ref().unwrap_or(&skipped),
    );
    let rows: Vec<(String, String, String)> = vec![
        row(
            "failover after kill -9 of the owner's speaker (median / max of 10)",
            bench::spread(&f.kill),
            bench::spread(&m.kill),
        ),
        row(
            "another node answers ARP after that kill (median / max of 10)",
            takeover(&f.kill_takeover),
            takeover(&m.kill_takeover),
        ),
        row(
            "failover after cutting the owner's link (median / max of 10)",
            bench::spread(&f.cut),
            bench::spread(&m.cut),
        ),
        row(
            "of those 20 rounds, VIP not back on its first owner within 60 s",
            f.not_back.to_string(),
            m.not_back.to_string(),
        ),
        row(
            "creation to EXTERNAL-IP, 1,000 assigned (median / p99)",
            ms(f.latency.get(&1000)),
            ms(m.latency.get(&1000)),
        ),
        row(
            &format!("creation to EXTERNAL-IP, {large} assigned (median / p99)"),
            ms(f.latency.get(&large)),
            ms(m.latency.get(&large)),
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
        let killed_at = std::cell::Cell::new(None);
        let started = Instant::now();
        let outage = if cut {
            measure_tcp_outage(
                w.lab.client(),
                target,
                || node.set_link(false),
                Duration::from_secs(60),
            )
        } else {
            let killed = w.speakers[owner].take().unwrap();
            let outage = measure_tcp_outage(
                w.lab.client(),
                target,
                || {
                    killed_at.set(Some(Instant::now()));
                    killed.kill_hard()
                },
                Duration::from_secs(60),
            );
            // The dead speaker's kernel goes on forwarding, so traffic may never stop;
            // what a dead node would cost is the time until another node answers.
            let old = w.lab.node(owner).mac();
            let answered = ferrolb::lab::poll_until(KILL_TAKEOVER, "another node", || {
                let macs = w.lab.client().arping_within(vip, Duration::from_millis(20));
                macs.iter().any(|m| *m != old).then(Instant::now)
            });
            let took = answered.ok().zip(killed_at.get()).map(|(a, k)| a - k);
            eprintln!(
                "{} kill {}: another node answers ARP after {}",
                project.name(),
                round + 1,
                took.map_or("never".into(), format_duration)
            );
            fig.kill_takeover.push(took);
            outage
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
        // Settled again: one node answers and carries traffic, the first owner once it
        // takes the VIP back (both projects hand it back after a hold-down). One that
        // does not within a minute is counted, and the next round starts from the owner
        // there is.
        let back = eventually(
            Duration::from_secs(120),
            "one node answering for the VIP and carrying traffic",
            || async {
                let now = w.owner(vip);
                let back = now == owner;
                (w.connects(vip) && (back || started.elapsed() > NOT_BACK)).then_some(back)
            },
        )
        .await;
        if !back {
            fig.not_back += 1;
            eprintln!(
                "{}: the VIP did not return to {} within {NOT_BACK:?}",
                project.name(),
                node.name()
            );
        }
    }

    // 1,000 Services on a pool of 900: 100 stay pending. Restart the controller.
    bulk_pool(project, &w, "198.18.0.0-198.18.3.131");
    w.create_bulk(0, 1000, BULK).await;
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
    let writes_before = bench::requests(&w.cluster.cp, project.controller_user());
    w.create_bulk(1000, large, BULK).await;
    wait_assigned(&w, large).await;
    let written = bench::writes(&bench::since(
        &writes_before,
        &bench::requests(&w.cluster.cp, project.controller_user()),
    ));
    fig.writes_per_service = written as f64 / (large - 1000) as f64;
    fig.latency.insert(large, latency(&w, "probe-large").await);
    fig.controller_rss = bench::rss_mib(controller.pid());
    fig.speaker_rss = w
        .speakers
        .iter()
        .flatten()
        .map(|s| bench::rss_mib(s.pid()))
        .fold(0.0, f64::max);

    tokio::time::sleep(Duration::from_secs(10)).await;
    let c0 = bench::requests(&w.cluster.cp, project.controller_user());
    let s0 = bench::requests(&w.cluster.cp, project.speaker_user());
    tokio::time::sleep(Duration::from_secs(60)).await;
    fig.controller_rest = bench::since(
        &c0,
        &bench::requests(&w.cluster.cp, project.controller_user()),
    )
    .values()
    .sum();
    fig.speaker_rest = bench::since(&s0, &bench::requests(&w.cluster.cp, project.speaker_user()))
        .values()
        .sum();
    eprintln!(
        "{} at rest: controller {:?}, speakers {:?}",
        project.name(),
        bench::since(
            &c0,
            &bench::requests(&w.cluster.cp, project.controller_user())
        ),
        bench::since(&s0, &bench::requests(&w.cluster.cp, project.speaker_user()))
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
        let server = std::fs::read_to_string(&w.speaker_kubeconfigs[0]).unwrap();
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
            // MetalLB announces only a Service with a ready endpoint; no kubelet runs
            // Pods here, so the Service has no selector and its EndpointSlice is written
            // by hand (ferrolb's speaker announces either way).
            w.cluster.apply(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
                 spec: {{type: LoadBalancer, ports: [{{port: {VIP_PORT}, targetPort: 8080, protocol: TCP}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: web-lab, namespace: default, labels: {{kubernetes.io/service-name: web}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080, protocol: TCP}}]\n\
                 endpoints: [{{addresses: [{}], conditions: {{ready: true}}, nodeName: {}}}]\n",
                w.lab.node(0).ipv4(),
                w.lab.node(0).name()
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
                    "table ip kube_proxy_like {{\n chain prerouting {{\n  type nat hook prerouting priority dstnat;\n  \
                     ip daddr {vip} tcp dport {VIP_PORT} dnat to {ip}:{node_port}\n }}\n}}\n"
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
/// Polls once a second: listing 10,000 Services every 20 ms would load the API server
/// (and so the projects being measured) more than the projects themselves.
async fn wait_assigned(w: &World, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let ips = w.cluster.ips("default").await;
        let n = ips
            .iter()
            .filter(|(k, v)| k.starts_with("bulk-") && !v.is_empty())
            .count();
        if n >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{count} bulk Services assigned: only {n} after 900 s"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Creates Services one at a time and times each from the create call to the watch
/// event that shows its IP.
async fn latency(w: &World, prefix: &str) -> Latency {
    let client = w.cluster.client().await;
    let api: Api<Service> = Api::namespaced(client, "default");
    let watch = || {
        watcher(api.clone(), watcher::Config::default())
            .applied_objects()
            .boxed()
    };
    let mut events = watch();
    let mut samples = Vec::new();
    let mut timed_out = 0;
    for i in 0..SAMPLES {
        let name = format!("{prefix}-{i}");
        let mut svc = cluster::load_balancer(&name, BULK);
        svc.spec.as_mut().unwrap().allocate_load_balancer_node_ports = Some(false);
        let started = Instant::now();
        api.create(&PostParams::default(), &svc).await.unwrap();
        let assigned = tokio::time::timeout(SAMPLE_TIMEOUT, async {
            while let Some(event) = events.next().await {
                if let Ok(svc) = event
                    && svc.metadata.name.as_deref() == Some(name.as_str())
                    && !ferrolb_allocator::input::ingress_ips(&svc).is_empty()
                {
                    return true;
                }
            }
            false
        })
        .await;
        if assigned == Ok(true) {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        } else {
            // Counted, not hidden: the row says how many never got an IP in time.
            timed_out += 1;
            eprintln!("{name}: no EXTERNAL-IP within {SAMPLE_TIMEOUT:?}");
            if timed_out == GIVE_UP_AFTER {
                eprintln!("{prefix}: {GIVE_UP_AFTER} samples got no IP; sampling stops");
                break;
            }
            events = watch();
        }
    }
    samples.sort_by(f64::total_cmp);
    Latency {
        median: bench::quantile(&samples, 0.5),
        p99: bench::quantile(&samples, 0.99),
        timed_out,
    }
}

/// Creation to EXTERNAL-IP of [`SAMPLES`] Services, in milliseconds.
#[derive(Clone, Copy, Debug)]
struct Latency {
    median: Option<f64>,
    p99: Option<f64>,
    /// Samples that got no IP within [`SAMPLE_TIMEOUT`] (left out of the quantiles).
    timed_out: usize,
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

/// [`spread`] of the takeovers, saying how many never happened.
fn takeover(takeovers: &[Option<Duration>]) -> String {
    let happened: Vec<Duration> = takeovers.iter().flatten().copied().collect();
    let never = takeovers.len() - happened.len();
    match never {
        0 => bench::spread(&happened),
        _ => format!("{never} never; {}", bench::spread(&happened)),
    }
}

fn ms(figures: Option<&Latency>) -> String {
    let Some(l) = figures else {
        return "-".into();
    };
    let q = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
    let late = match l.timed_out {
        0 => String::new(),
        n => format!(" ({n} timed out)"),
    };
    format!("{} / {} ms{late}", q(l.median), q(l.p99))
}

fn mib(v: f64) -> String {
    format!("{v:.1} MiB")
}
