//! ferrolb against MetalLB (Layer 2 mode) on real nodes, one after the other in one run:
//! each project gets a fresh three-node cluster of `tests/nodes/up` (kubelet, containerd,
//! kube-proxy in iptables mode, the API server's audit log on), is installed with its own
//! Helm chart (MetalLB's from its Go module, with images built from that module by
//! tests/metallb/build; FRR off, as L2 needs none), and serves the same Services to the
//! same client:
//!
//! * `helm install --wait` until every Pod is Ready; Service creation until the VIP
//!   answers through kube-proxy;
//! * after SIGKILL of the owner's speaker container: the time until another node answers
//!   ARP, and the outage the client sees (the node's kube-proxy still forwards);
//! * the outage after cutting the owner's link;
//! * creation to EXTERNAL-IP (median, p99) with N Services assigned (each with the
//!   backends' EndpointSlice, so both speakers track real endpoints);
//! * controller and speaker resident memory at N Services; API writes per Service and
//!   requests per minute at rest;
//! * IPs moved by deleting the controller Pods (N Services, some pending).
//!
//! `cargo bench -p ferrolb --bench versus_metallb_on_nodes`, as root.
//! `FERROLB_BENCH_SERVICES` (default 1,000) and `FERROLB_BENCH_ROUNDS` (default 10) change
//! the Service count and the failover rounds; `FERROLB_BENCH_ONLY=ferrolb|metallb` runs
//! one project.

#[path = "../tests/cluster/bench.rs"]
#[allow(dead_code)]
mod bench;
#[path = "../tests/e2e/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "../tests/e2e/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cluster::{CHART, Cluster, poll};
use ferrolb::lab::{format_duration, measure_tcp_outage};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

const SAMPLES: usize = 100;
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Sampling stops after this long, so a project that takes seconds per Service ends the
/// run in bounded time; the row says how many samples it took.
const SAMPLING_BUDGET: Duration = Duration::from_secs(300);
const NS: &str = "bench";
/// Bulk Services take this pool (MetalLB's annotation, which ferrolb honours too).
const BULK_POOL: &str = "bulk";
const VIP_POOL: &str = "vip";

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

    fn namespace(self) -> &'static str {
        match self {
            Project::Ferrolb => "ferrolb-system",
            Project::Metallb => "metallb-system",
        }
    }

    fn user(self, component: &str) -> String {
        match self {
            Project::Ferrolb => format!("system:serviceaccount:ferrolb-system:ferrolb-{component}"),
            Project::Metallb => format!("system:serviceaccount:metallb-system:metallb-{component}"),
        }
    }

    /// The speaker and controller containers' names in their Pods.
    fn container(self, component: &str) -> &'static str {
        match (self, component) {
            (_, "speaker") => "speaker",
            _ => "controller",
        }
    }
}

#[derive(Default, Debug)]
struct Figures {
    install: Duration,
    first_answer: Duration,
    kill_takeover: Vec<Option<Duration>>,
    kill_outage: Vec<Duration>,
    cut_outage: Vec<Duration>,
    not_back: usize,
    /// A rolling restart of the speakers: did a connection kept open survive, and the
    /// longest gap between new connections (every 20 ms), failed of all.
    roll: Option<(bool, Duration, u32, u32)>,
    latency: Option<Latency>,
    writes_per_service: f64,
    controller_rest: usize,
    speaker_rest: usize,
    controller_rss: f64,
    speaker_rss: f64,
    moved_by_restart: usize,
    pending_at_restart: usize,
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let metallb = cluster::build_metallb().expect("building MetalLB");
    let only = std::env::var("FERROLB_BENCH_ONLY").unwrap_or_default();
    let count = env_count("FERROLB_BENCH_SERVICES", 1000);
    let rounds = env_count("FERROLB_BENCH_ROUNDS", 10);
    let mut results = Vec::new();
    for project in [Project::Ferrolb, Project::Metallb] {
        if !only.is_empty() && !project.name().eq_ignore_ascii_case(&only) {
            results.push(Figures::default());
            continue;
        }
        eprintln!("== {}", project.name());
        let figures = measure(project, &metallb, count, rounds)
            .unwrap_or_else(|e| panic!("{}: {e:#}", project.name()));
        eprintln!("{} figures: {figures:?}", project.name());
        results.push(figures);
    }
    let (f, m) = (&results[0], &results[1]);
    let rows = [
        (
            "helm install --wait until every Pod is Ready",
            secs(f.install),
            secs(m.install),
        ),
        (
            "Service created until its VIP answers",
            ms_of(f.first_answer),
            ms_of(m.first_answer),
        ),
        (
            &*format!("another node answers ARP after kill -9 of the owner's speaker ({rounds})"),
            takeover(&f.kill_takeover),
            takeover(&m.kill_takeover),
        ),
        (
            &*format!("outage after that kill, client's view ({rounds})"),
            bench::spread(&f.kill_outage),
            bench::spread(&m.kill_outage),
        ),
        (
            &*format!("outage after cutting the owner's link ({rounds})"),
            bench::spread(&f.cut_outage),
            bench::spread(&m.cut_outage),
        ),
        (
            "rounds after which the VIP was not back on its first owner in 60 s",
            f.not_back.to_string(),
            m.not_back.to_string(),
        ),
        (
            "rolling restart of the speakers: a connection kept open",
            roll_kept(f.roll),
            roll_kept(m.roll),
        ),
        (
            "rolling restart of the speakers: new connections every 20 ms (longest gap, failed)",
            roll_gaps(f.roll),
            roll_gaps(m.roll),
        ),
        (
            &*format!("creation to EXTERNAL-IP, {count} assigned (median / p99)"),
            latency_text(f.latency),
            latency_text(m.latency),
        ),
        (
            &*format!("controller resident memory, {count} Services"),
            mib(f.controller_rss),
            mib(m.controller_rss),
        ),
        (
            &*format!("speaker resident memory (largest), {count} Services"),
            mib(f.speaker_rss),
            mib(m.speaker_rss),
        ),
        (
            "controller API writes per Service",
            format!("{:.2}", f.writes_per_service),
            format!("{:.2}", m.writes_per_service),
        ),
        (
            "controller API requests per minute at rest",
            f.controller_rest.to_string(),
            m.controller_rest.to_string(),
        ),
        (
            "speaker API requests per minute at rest (3 speakers)",
            f.speaker_rest.to_string(),
            m.speaker_rest.to_string(),
        ),
        (
            "IPs moved by deleting the controller Pods",
            format!("{} ({} pending)", f.moved_by_restart, f.pending_at_restart),
            format!("{} ({} pending)", m.moved_by_restart, m.pending_at_restart),
        ),
    ]
    .map(|(k, a, b)| (k.to_string(), a, b));
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!(
        "\n{:width$}  {:>22}  {:>22}",
        "real nodes, 2 cores", "ferrolb", "MetalLB 0.15.2"
    );
    for (k, a, b) in rows {
        println!("{k:width$}  {a:>22}  {b:>22}");
    }
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

fn measure(project: Project, metallb: &Path, count: usize, rounds: usize) -> Result<Figures> {
    let mut fig = Figures::default();
    let name = format!("vs-{}", project.name().to_lowercase());
    let images = metallb.join("images");
    let (controller_image, speaker_image) = (
        images.join("controller.oci.tar"),
        images.join("speaker.oci.tar"),
    );
    let mut args = vec![
        "--nodes",
        "3",
        "--proxy-mode",
        "iptables",
        "--ip-family",
        "ipv4",
        "--audit",
    ];
    if project == Project::Metallb {
        args.extend([
            "--load",
            controller_image.to_str().unwrap(),
            "--load",
            speaker_image.to_str().unwrap(),
        ]);
    }
    let c = Cluster::up(&name, &args)?;
    let rt = tokio::runtime::Runtime::new()?;
    let audit = std::env::var("FERROLB_NODES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/tmp/ferrolb-nodes"))
        .join(&name)
        .join("audit.log");

    // Install, as each project's docs say.
    let started = Instant::now();
    match project {
        Project::Ferrolb => {
            let (repository, tag) = c.image.rsplit_once(':').context("image without a tag")?;
            c.helm(&[
                "install",
                "ferrolb",
                CHART,
                "-n",
                "ferrolb-system",
                "--create-namespace",
                "--set",
                &format!("image.repository={repository}"),
                "--set",
                &format!("image.tag={tag}"),
                "--wait",
                "--timeout",
                "5m",
            ])?;
        }
        Project::Metallb => {
            let version = metallb_version(metallb);
            c.helm(&[
                "install",
                "metallb",
                metallb.join("chart").to_str().unwrap(),
                "-n",
                "metallb-system",
                "--create-namespace",
                "--set",
                "controller.image.repository=localhost/metallb/controller",
                "--set",
                &format!("controller.image.tag={version}"),
                "--set",
                "controller.image.pullPolicy=IfNotPresent",
                "--set",
                "speaker.image.repository=localhost/metallb/speaker",
                "--set",
                &format!("speaker.image.tag={version}"),
                "--set",
                "speaker.image.pullPolicy=IfNotPresent",
                "--set",
                "speaker.frr.enabled=false",
                "--wait",
                "--timeout",
                "5m",
            ])?;
        }
    }
    fig.install = started.elapsed();
    eprintln!(
        "{}: installed in {}",
        project.name(),
        format_duration(fig.install)
    );

    // Pools: the VIP's from the node subnet, announced; the bulk one only assigns.
    let vips = c.top4(0, 8);
    let (group, ns) = match project {
        Project::Ferrolb => ("ferrolb.io", String::new()),
        Project::Metallb => ("metallb.io", "namespace: metallb-system, ".to_string()),
    };
    let pool = |name: &str, range: &str| {
        format!(
            "apiVersion: {group}/v1beta1\nkind: IPAddressPool\nmetadata: {{{ns}name: {name}}}\n\
             spec: {{addresses: [{range}], autoAssign: false}}\n---\n"
        )
    };
    c.apply(&format!(
        "{}{}apiVersion: {group}/v1beta1\nkind: L2Advertisement\nmetadata: {{{ns}name: {VIP_POOL}}}\n\
         spec: {{ipAddressPools: [{VIP_POOL}]}}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n",
        pool(VIP_POOL, &format!("{}-{}", vips[0], vips[vips.len() - 1])),
        // Room for all but the last 100 of the bulk Services (pending at the restart).
        pool(BULK_POOL, &format!("10.100.0.0-{}", Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 0)) + count.saturating_sub(101) as u32))),
    ))?;
    c.apply(&backend(&c))?;
    c.kubectl(
        &[
            "rollout",
            "status",
            "-n",
            NS,
            "deployment/web",
            "--timeout=2m",
        ],
        None,
    )?;
    let started = Instant::now();
    c.apply(&service("web", VIP_POOL))?;
    let vip = rt.block_on(c.wait_ips(NS, "web", 1))?[0];
    let (_, _) = client::wait_answer(&c.client, vip, Duration::from_secs(60))?;
    fig.first_answer = started.elapsed();

    // Failover: SIGKILL of the owner's speaker container, then the owner's link cut.
    let nodes = rt.block_on(c.node_ips())?;
    for round in 0..2 * rounds {
        let cut = round >= rounds;
        let owner = owner_of(&c, vip, &nodes)?;
        let first_owner = owner.0.clone();
        let target = SocketAddr::new(vip, 80);
        let started = Instant::now();
        let outage = if cut {
            measure_tcp_outage(
                &c.client,
                target,
                || c.node(&owner.0, &["link", "down"]).map(drop),
                Duration::from_secs(90),
            )?
        } else {
            let pid = container_pid(&c, &owner.0, project.container("speaker"))?;
            let killed_at = std::cell::Cell::new(None);
            let outage = measure_tcp_outage(
                &c.client,
                target,
                || {
                    killed_at.set(Some(Instant::now()));
                    nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    )
                    .context("killing the speaker")
                },
                Duration::from_secs(90),
            )?;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut took = None;
            while Instant::now() < deadline {
                let macs = client::arping(&c.client, vip, Duration::from_millis(20))?;
                if macs.iter().any(|m| *m != owner.1) {
                    took = killed_at.get().map(|k| k.elapsed());
                    break;
                }
            }
            eprintln!(
                "{} kill {}: another node answers ARP after {}",
                project.name(),
                round + 1,
                took.map_or("never".into(), format_duration)
            );
            fig.kill_takeover.push(took);
            // A new speaker Pod rather than the kubelet's restart, whose back-off grows
            // with every kill of the same container (up to five minutes).
            c.kubectl(
                &[
                    "delete",
                    "pod",
                    "-n",
                    project.namespace(),
                    "-l",
                    "app.kubernetes.io/component=speaker",
                    "--field-selector",
                    &format!("spec.nodeName={}", owner.0),
                    "--wait=false",
                ],
                None,
            )?;
            outage
        };
        eprintln!(
            "{} {} {}: outage {}",
            project.name(),
            if cut { "link cut" } else { "kill" },
            round % rounds + 1,
            format_duration(outage.duration)
        );
        if cut {
            fig.cut_outage.push(outage.duration);
            c.node(&owner.0, &["link", "up"])?;
        } else {
            fig.kill_outage.push(outage.duration);
        }
        // Settled: one node answers and carries traffic, the first owner once it is back
        // (both projects hand the IP back); one that is not back within a minute counts.
        let back = loop {
            let now = owner_of(&c, vip, &nodes).ok();
            let connects = client::ask(&c.client, vip).is_ok();
            let ready = rt.block_on(all_ready(&c, project.namespace()));
            match now {
                Some(n) if connects && ready && n.0 == first_owner => break true,
                Some(_) if connects && ready && started.elapsed() > Duration::from_secs(60) => {
                    break false;
                }
                _ if started.elapsed() > Duration::from_secs(180) => {
                    bail!("{vip} did not settle after round {}", round + 1)
                }
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        if !back {
            fig.not_back += 1;
        }
    }

    // A rolling restart of the speakers, as an upgrade does, with one connection open.
    let mut kept = client::Kept::open(&c.client, vip, 80)?;
    kept.get("/hostname")?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probes = client::probe_until(&c.client, vip, done.clone());
    let daemonset = format!("daemonset/{}-speaker", release(project));
    let rolled = c
        .kubectl(
            &["rollout", "restart", "-n", project.namespace(), &daemonset],
            None,
        )
        .and_then(|_| {
            c.kubectl(
                &[
                    "rollout",
                    "status",
                    "-n",
                    project.namespace(),
                    &daemonset,
                    "--timeout=5m",
                ],
                None,
            )
        });
    let survived = kept.get("/hostname").is_ok();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let gaps = probes
        .join()
        .map_err(|_| anyhow::anyhow!("the probing thread panicked"))??;
    rolled?;
    fig.roll = Some((survived, gaps.longest, gaps.failed, gaps.probes));
    eprintln!(
        "{}: speakers rolled; kept connection survived: {survived}",
        project.name()
    );

    // N Services with endpoints; the last 100 find the bulk pool exhausted.
    let controller_user = project.user("controller");
    let before = bench::requests_in(&audit, &controller_user);
    rt.block_on(create_bulk(&c, count))?;
    let assigned = rt.block_on(wait_assigned(&c, count - 100))?;
    fig.writes_per_service = bench::writes(&bench::since(
        &before,
        &bench::requests_in(&audit, &controller_user),
    )) as f64
        / count as f64;
    fig.pending_at_restart = count - assigned.values().filter(|v| !v.is_empty()).count();
    // The controller restarts (its Pods deleted): nothing assigned may move.
    c.kubectl(
        &[
            "delete",
            "pod",
            "-n",
            project.namespace(),
            "-l",
            "app.kubernetes.io/component=controller",
            "--wait=true",
        ],
        None,
    )?;
    c.kubectl(
        &[
            "rollout",
            "status",
            "-n",
            project.namespace(),
            &format!("deployment/{}-controller", release(project)),
            "--timeout=3m",
        ],
        None,
    )?;
    std::thread::sleep(Duration::from_secs(15));
    let after = rt.block_on(ips(&c))?;
    fig.moved_by_restart = assigned
        .iter()
        .filter(|(k, v)| !v.is_empty() && after.get(*k) != Some(v))
        .count();
    // Room for everyone again, then latency with N assigned.
    c.apply(&pool(BULK_POOL, "10.100.0.0/16"))?;
    rt.block_on(wait_assigned(&c, count))?;
    fig.latency = Some(rt.block_on(latency(&c))?);
    fig.controller_rss = rss(&c, project, "controller", &rt)?;
    fig.speaker_rss = rss(&c, project, "speaker", &rt)?;

    std::thread::sleep(Duration::from_secs(10));
    let speaker_user = project.user("speaker");
    let (c0, s0) = (
        bench::requests_in(&audit, &controller_user),
        bench::requests_in(&audit, &speaker_user),
    );
    std::thread::sleep(Duration::from_secs(60));
    let (c1, s1) = (
        bench::requests_in(&audit, &controller_user),
        bench::requests_in(&audit, &speaker_user),
    );
    fig.controller_rest = bench::since(&c0, &c1).values().sum();
    fig.speaker_rest = bench::since(&s0, &s1).values().sum();
    eprintln!(
        "{} at rest: controller {}; speakers {}",
        project.name(),
        bench::describe(&bench::since(&c0, &c1)),
        bench::describe(&bench::since(&s0, &s1))
    );
    Ok(fig)
}

fn release(project: Project) -> &'static str {
    match project {
        Project::Ferrolb => "ferrolb",
        Project::Metallb => "metallb",
    }
}

fn backend(c: &Cluster) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {NS}}}\n\
         spec:\n  replicas: 3\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    \
         spec:\n      topologySpreadConstraints: [{{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {{matchLabels: {{app: web}}}}}}]\n      \
         containers: [{{name: web, image: {}, args: [netexec, --http-port=8080], ports: [{{containerPort: 8080}}], \
         readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}}}]\n",
        c.backend_image
    )
}

fn service(name: &str, pool: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {NS}, annotations: {{metallb.io/address-pool: {pool}}}}}\n\
         spec: {{type: LoadBalancer, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
    )
}

/// The node whose MAC answers ARP for `vip` (its name and MAC).
fn owner_of(c: &Cluster, vip: IpAddr, nodes: &[(String, Ipv4Addr)]) -> Result<(String, [u8; 6])> {
    let macs = client::arping(&c.client, vip, client::ARP_POLL)?;
    let [mac] = macs.as_slice() else {
        bail!("{vip} is answered by {macs:02x?}");
    };
    for (node, ip) in nodes {
        if client::arping(&c.client, IpAddr::V4(*ip), client::ARP_POLL)?.contains(mac) {
            return Ok((node.clone(), *mac));
        }
    }
    bail!("{vip} is answered by {mac:02x?}, no node's MAC")
}

/// The host pid of the running container `name` on `node`.
fn container_pid(c: &Cluster, node: &str, name: &str) -> Result<i32> {
    let id = c.node(
        node,
        &["crictl", "ps", "--name", &format!("^{name}$"), "-q"],
    )?;
    let id = id
        .lines()
        .next()
        .with_context(|| format!("no {name} container on {node}"))?
        .to_string();
    let pid = c.node(
        node,
        &[
            "crictl",
            "inspect",
            "-o",
            "go-template",
            "--template",
            "{{.info.pid}}",
            &id,
        ],
    )?;
    pid.trim()
        .parse()
        .with_context(|| format!("crictl inspect {id}: {pid:?}"))
}

/// The largest resident memory of the project's `component` containers (for the
/// controller: the active one, the Lease holder for ferrolb).
fn rss(
    c: &Cluster,
    project: Project,
    component: &str,
    rt: &tokio::runtime::Runtime,
) -> Result<f64> {
    let pods = rt.block_on(async {
        let api: Api<Pod> = Api::namespaced(c.client().await?, project.namespace());
        let mut pods = api
            .list(
                &ListParams::default().labels(&format!("app.kubernetes.io/component={component}")),
            )
            .await?
            .items;
        if project == Project::Ferrolb && component == "controller" {
            let lease = Api::<Lease>::namespaced(c.client().await?, project.namespace())
                .get("ferrolb-controller")
                .await?;
            let holder = lease
                .spec
                .and_then(|s| s.holder_identity)
                .unwrap_or_default();
            pods.retain(|p| p.metadata.name.as_deref() == Some(holder.as_str()));
        }
        Ok::<_, anyhow::Error>(pods)
    })?;
    let mut largest: f64 = 0.0;
    for pod in pods {
        let node = pod
            .spec
            .and_then(|s| s.node_name)
            .context("an unscheduled Pod")?;
        let pid = container_pid(c, &node, project.container(component))?;
        largest = largest.max(bench::rss_mib(pid as u32));
    }
    Ok(largest)
}

async fn all_ready(c: &Cluster, namespace: &str) -> bool {
    let Ok(client) = c.client().await else {
        return false;
    };
    let Ok(pods) = Api::<Pod>::namespaced(client, namespace)
        .list(&ListParams::default())
        .await
    else {
        return false;
    };
    pods.items.iter().all(|p| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    })
}

async fn create_bulk(c: &Cluster, count: usize) -> Result<()> {
    let api: Api<Service> = Api::namespaced(c.client().await?, NS);
    let posts = (0..count).map(|i| {
        let api = api.clone();
        async move {
            let mut svc: Service = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("bulk-{i}"), "annotations": {"metallb.io/address-pool": BULK_POOL}},
                "spec": {"type": "LoadBalancer", "selector": {"app": "web"}, "allocateLoadBalancerNodePorts": false,
                         "ports": [{"port": 80, "targetPort": 8080}]},
            }))?;
            svc.metadata.namespace = Some(NS.into());
            api.create(&PostParams::default(), &svc).await?;
            Ok::<_, anyhow::Error>(())
        }
    });
    let results: Vec<Result<()>> = futures::stream::iter(posts)
        .buffer_unordered(8)
        .collect()
        .await;
    results.into_iter().collect()
}

/// Every bulk Service's IPs.
async fn ips(c: &Cluster) -> Result<BTreeMap<String, Vec<IpAddr>>> {
    let api: Api<Service> = Api::namespaced(c.client().await?, NS);
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|s| {
            s.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("bulk-"))
        })
        .map(|s| {
            (
                s.metadata.name.clone().unwrap_or_default(),
                ferrolb_allocator::input::ingress_ips(s),
            )
        })
        .collect())
}

/// Waits (polling once a second) until `count` bulk Services have an IP.
async fn wait_assigned(c: &Cluster, count: usize) -> Result<BTreeMap<String, Vec<IpAddr>>> {
    poll(
        &format!("{count} bulk Services with an IP"),
        Duration::from_secs(900),
        || async {
            let ips = ips(c).await.ok()?;
            (ips.values().filter(|v| !v.is_empty()).count() >= count).then_some(ips)
        },
    )
    .await
}

/// Creation to EXTERNAL-IP, watched.
#[derive(Debug, Clone, Copy)]
struct Latency {
    median_ms: f64,
    p99_ms: f64,
    samples: usize,
    /// Services that got no IP within [`SAMPLE_TIMEOUT`].
    timed_out: usize,
}

/// Creation to EXTERNAL-IP of up to [`SAMPLES`] Services, one at a time, for at most
/// [`SAMPLING_BUDGET`].
async fn latency(c: &Cluster) -> Result<Latency> {
    let api: Api<Service> = Api::namespaced(c.client().await?, NS);
    let mut events = watcher(api.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let mut samples = Vec::new();
    let mut timed_out = 0;
    let begun = Instant::now();
    for i in 0..SAMPLES {
        if begun.elapsed() > SAMPLING_BUDGET {
            break;
        }
        let name = format!("probe-{i}");
        let svc: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": NS, "annotations": {"metallb.io/address-pool": BULK_POOL}},
            "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false, "ports": [{"port": 80}]},
        }))?;
        let started = Instant::now();
        api.create(&PostParams::default(), &svc).await?;
        let got = tokio::time::timeout(SAMPLE_TIMEOUT, async {
            while let Some(Ok(svc)) = events.next().await {
                if svc.metadata.name.as_deref() == Some(name.as_str())
                    && !ferrolb_allocator::input::ingress_ips(&svc).is_empty()
                {
                    return true;
                }
            }
            false
        })
        .await;
        if got == Ok(true) {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        } else {
            timed_out += 1;
            if timed_out == 4 {
                break;
            }
        }
        api.delete(&name, &DeleteParams::default()).await?;
    }
    samples.sort_by(f64::total_cmp);
    Ok(Latency {
        median_ms: bench::quantile(&samples, 0.5).unwrap_or(f64::NAN),
        p99_ms: bench::quantile(&samples, 0.99).unwrap_or(f64::NAN),
        samples: samples.len(),
        timed_out,
    })
}

fn metallb_version(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn takeover(takeovers: &[Option<Duration>]) -> String {
    let happened: Vec<Duration> = takeovers.iter().flatten().copied().collect();
    match takeovers.len() - happened.len() {
        0 => bench::spread(&happened),
        never => format!("{never} never; {}", bench::spread(&happened)),
    }
}

fn latency_text(l: Option<Latency>) -> String {
    let Some(l) = l else { return "-".into() };
    let mut text = format!("{:.1} / {:.1} ms", l.median_ms, l.p99_ms);
    if l.samples < SAMPLES {
        text += &format!(" ({} samples", l.samples);
        if l.timed_out > 0 {
            text += &format!(", {} timed out", l.timed_out);
        }
        text += ")";
    }
    text
}

fn roll_kept(roll: Option<(bool, Duration, u32, u32)>) -> String {
    match roll {
        None => "-".into(),
        Some((true, ..)) => "survived".into(),
        Some((false, ..)) => "reset".into(),
    }
}

fn roll_gaps(roll: Option<(bool, Duration, u32, u32)>) -> String {
    match roll {
        None => "-".into(),
        Some((_, longest, failed, all)) => format!("{} ms, {failed} of {all}", longest.as_millis()),
    }
}

fn secs(d: Duration) -> String {
    if d.is_zero() {
        "-".into()
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn ms_of(d: Duration) -> String {
    if d.is_zero() {
        "-".into()
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn mib(v: f64) -> String {
    format!("{v:.1} MiB")
}
