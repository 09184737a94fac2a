//! The live switch from MetalLB to ferrolb and back, on real nodes, as docs/migration.md
//! tells a user to do it, while a client keeps connecting to every VIP.
//!
//! Three nodes of `tests/nodes/up` (kubelet, containerd, kube-proxy in iptables mode);
//! MetalLB (Layer 2, FRR off) installed with its own Helm chart and images, both built
//! from its published Go module by tests/metallb/build; [`SERVICES`] LoadBalancer
//! Services in two namespaces, given their IPs by MetalLB from two pools (one of them for
//! one namespace only). Then:
//!
//! 1. `ferrolb import metallb` against the live cluster: every Service keeps its IPs;
//!    ferrolb's CRDs and the converted objects applied;
//! 2. MetalLB's controller scaled to 0;
//! 3. ferrolb installed with its chart, no pools in its values; its pools count every IP;
//! 4. MetalLB's speaker DaemonSet deleted: every VIP is answered by one ferrolb speaker.
//!
//! And back: ferrolb's controller scaled to 0, MetalLB's scaled up and its speaker
//! reinstalled (`helm upgrade`), `helm uninstall ferrolb`.
//!
//! A watch on every Service asserts that no IP changes at any moment, not only at the
//! end. The client opens new TCP connections to every VIP in turn throughout; the test
//! prints, per step, the longest time any VIP went without a successful connection and
//! the connections that failed: the outage a user sees.
//!
//! Needs root, Go and the tests/nodes binaries (docs/testing.md); without them it fails.

#[path = "e2e/client.rs"]
#[allow(dead_code)]
mod client;
#[path = "e2e/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use cluster::{CHART, Cluster, DEADLINE, poll};
use ferrolb::lab::{Netns, Origin};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Api;
use kube::api::ListParams;
use kube::runtime::{WatchStreamExt, watcher};

/// Services moved: at least the hundred the issue asks for.
const SERVICES: usize = 100;
/// Two namespaces: `shop` has a pool of its own, the rest take the general pool.
const NAMESPACES: [&str; 2] = ["shop", "blog"];
const METALLB_NS: &str = "metallb-system";

/// The steps the client's figures are reported by, in order.
const STEPS: [&str; 7] = [
    "import, apply",
    "MetalLB's controller to 0",
    "helm install ferrolb",
    "MetalLB's speaker deleted",
    "ferrolb's controller to 0, MetalLB's back",
    "MetalLB's speaker reinstalled",
    "helm uninstall ferrolb",
];

#[test]
fn metallb_to_ferrolb_and_back_moves_no_ip() {
    if let Err(e) = run() {
        panic!("{e:#}");
    }
}

fn run() -> Result<()> {
    let metallb = cluster::build_metallb()?;
    let version = metallb
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("tests/metallb/build printed no version directory")?;
    let images = metallb.join("images");
    let c = Cluster::up(
        "migration",
        &[
            "--nodes",
            "3",
            "--proxy-mode",
            "iptables",
            "--ip-family",
            "ipv4",
            "--load",
            images.join("controller.oci.tar").to_str().unwrap(),
            "--load",
            images.join("speaker.oci.tar").to_str().unwrap(),
        ],
    )?;
    let rt = tokio::runtime::Runtime::new()?;

    // MetalLB, installed as its docs say, serving the Services.
    let metallb_chart = metallb.join("chart");
    let metallb_values = [
        "--set".to_string(),
        "controller.image.repository=localhost/metallb/controller".into(),
        "--set".into(),
        format!("controller.image.tag={version}"),
        "--set".into(),
        "speaker.image.repository=localhost/metallb/speaker".into(),
        "--set".into(),
        format!("speaker.image.tag={version}"),
        "--set".into(),
        "speaker.frr.enabled=false".into(),
    ];
    let started = Instant::now();
    let mut install = vec![
        "install",
        "metallb",
        metallb_chart.to_str().unwrap(),
        "-n",
        METALLB_NS,
        "--create-namespace",
        "--wait",
        "--timeout",
        "5m",
    ];
    install.extend(metallb_values.iter().map(String::as_str));
    c.helm(&install)?;
    eprintln!(
        "MetalLB {version} installed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    // The shop's pool comes first for its namespace; 60 addresses each, from the top of
    // the node subnet.
    let shop = c.top4(0, 60);
    let general = c.top4(60, 60);
    let range = |r: &[std::net::Ipv4Addr]| format!("{}-{}", r[0], r[r.len() - 1]);
    let mut config = format!(
        "apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: shop, namespace: {METALLB_NS}}}\n\
         spec:\n  addresses: [{}]\n  serviceAllocation: {{priority: 10, namespaces: [shop]}}\n---\n\
         apiVersion: metallb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: general, namespace: {METALLB_NS}}}\n\
         spec: {{addresses: [{}]}}\n---\n\
         apiVersion: metallb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: l2, namespace: {METALLB_NS}}}\n\
         spec: {{ipAddressPools: [shop, general]}}\n",
        range(&shop),
        range(&general)
    );
    for ns in NAMESPACES {
        config += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}}}\n---\n{}",
            backend(&c, ns)
        );
    }
    c.apply(&config)?;
    for ns in NAMESPACES {
        c.kubectl(
            &[
                "rollout",
                "status",
                "-n",
                ns,
                "deployment/web",
                "--timeout=3m",
            ],
            None,
        )?;
    }
    let services: String = (0..SERVICES)
        .map(|i| service(NAMESPACES[i % 2], &format!("web-{i}")))
        .collect();
    c.apply(&services)?;
    let before = rt.block_on(poll(
        &format!("MetalLB to give {SERVICES} Services their IPs"),
        DEADLINE,
        || async { all_ips(&c).await.ok().filter(|m| m.len() == SERVICES) },
    ))?;
    let in_shop_pool = before
        .iter()
        .filter(|(k, v)| k.starts_with("shop/") && v.iter().all(|ip| in_range(ip, &shop)))
        .count();
    ensure!(
        in_shop_pool == SERVICES / 2,
        "MetalLB gave {in_shop_pool} of the shop's Services an IP of the shop's pool"
    );
    let vips: Vec<(String, IpAddr)> = before
        .iter()
        .flat_map(|(k, v)| v.iter().map(move |ip| (k.clone(), *ip)))
        .collect();
    for (name, vip) in &vips {
        client::wait_answer(&c.client, *vip, DEADLINE)
            .with_context(|| format!("{name} ({vip}) served by MetalLB"))?;
    }
    eprintln!("MetalLB serves {SERVICES} Services, every VIP answers");

    // From here on, every change of a Service's IPs is seen, and the client connects to
    // every VIP in turn.
    let changes = Arc::new(Mutex::new(Vec::<String>::new()));
    let watch = rt.spawn(watch_ips(
        rt.block_on(c.client())?,
        before.clone(),
        changes.clone(),
    ));
    let prober = Prober::start(&c.client, vips.iter().map(|v| v.1).collect());
    let mut report = Report::default();

    // 1. Convert, check, apply.
    let dir = tempfile::tempdir()?;
    let dir = dir.path();
    let (ok, out, err) = ferrolb(&[
        "import",
        "metallb",
        "--kubeconfig",
        c.kubeconfig.to_str().unwrap(),
        "-o",
        dir.to_str().unwrap(),
    ])?;
    eprintln!("ferrolb import metallb:\n{err}{out}");
    ensure!(ok, "ferrolb import metallb failed:\n{err}");
    ensure!(
        err.contains(&format!(
            "Services: {SERVICES} keep their IPs, 0 would change IP"
        )),
        "import did not say that all {SERVICES} Services keep their IPs:\n{err}"
    );
    let (ok, crds, err) = ferrolb(&["crds"])?;
    ensure!(ok, "ferrolb crds: {err}");
    c.kubectl(&["apply", "--server-side", "-f", "-"], Some(&crds))?;
    c.kubectl(&["apply", "-f", dir.to_str().unwrap()], None)?;
    prober.next_step();

    // 2. MetalLB's controller stops writing.
    scale(&c, METALLB_NS, "metallb-controller", 0)?;
    rt.block_on(pods_gone(
        &c,
        METALLB_NS,
        "app.kubernetes.io/component=controller",
    ))?;
    prober.next_step();

    // 3. ferrolb, with no pools of its chart: it adopts what the Services hold.
    let (repository, tag) = c.image.rsplit_once(':').context("image without a tag")?;
    let started = Instant::now();
    c.helm(&[
        "install",
        cluster::RELEASE,
        CHART,
        "-n",
        cluster::NAMESPACE,
        "--create-namespace",
        "--set",
        &format!("image.repository={repository}"),
        "--set",
        &format!("image.tag={tag}"),
        "--wait",
        "--timeout",
        "5m",
    ])?;
    report.line(format!(
        "helm install ferrolb --wait: {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    let counts = rt.block_on(poll(
        "ferrolb's pools to count every Service's IP",
        DEADLINE,
        || async {
            let counts = pool_counts(&c).ok()?;
            (counts.get("shop") == Some(&(SERVICES / 2))
                && counts.get("general") == Some(&(SERVICES / 2)))
            .then_some(counts)
        },
    ))?;
    report.line(format!("ferrolb's pools after adoption: {counts:?}"));
    // Beside MetalLB's speakers, ferrolb's do not fight them, and the Services say so: an
    // IP whose elected node is not the one MetalLB answers from is held back, with a
    // condition naming the MAC that answers; the others are announced by that very node.
    let macs = node_macs(&c, &rt.block_on(c.node_ips())?)?;
    // Checked until the conditions and the wire agree: MetalLB's speakers answer now and
    // then from another node while their memberlist shifts, which a routine check may
    // hear between two of the client's looks; ferrolb's next check clears that.
    let settle_by = Instant::now() + DEADLINE;
    let mut looks = 0;
    let (held, same_node) = loop {
        looks += 1;
        let conditions = rt.block_on(poll(
            "a ferrolb condition on every VIP",
            DEADLINE,
            || async {
                let all = conditions(&c).await.ok()?;
                (all.len() == vips.len()).then_some(all)
            },
        ))?;
        match beside_metallb(&vips, &arping_all(&c, &vips)?, &conditions, &macs) {
            Ok(counts) => break counts,
            Err(e) if Instant::now() < settle_by => {
                eprintln!("look {looks}: {e:#}; looking again");
            }
            Err(e) => return Err(e.context(format!("not settled after {looks} looks"))),
        }
    };
    report.line(format!(
        "beside MetalLB's speakers: {held} VIPs held back by ferrolb, each condition naming the MAC and the node MetalLB answers from; {same_node} announced by the node MetalLB answers from (agreed at look {looks})"
    ));
    prober.next_step();

    // 4. MetalLB's speakers go; ferrolb's announce every IP.
    let deleted = Instant::now();
    c.kubectl(
        &["-n", METALLB_NS, "delete", "daemonset", "metallb-speaker"],
        None,
    )?;
    rt.block_on(pods_gone(
        &c,
        METALLB_NS,
        "app.kubernetes.io/component=speaker",
    ))?;
    let gone = deleted.elapsed();
    rt.block_on(poll("ferrolb to announce every VIP", DEADLINE, || async {
        (announced(&c).await.ok()? == vips.len()).then_some(())
    }))?;
    report.line(format!(
        "MetalLB's speaker Pods gone {} ms after the delete; every VIP announced by ferrolb {} ms after it",
        gone.as_millis(),
        deleted.elapsed().as_millis()
    ));
    let owners = one_answer_each(&c, &vips)?;
    report.line(format!(
        "every VIP answered by one MAC, ferrolb's: {} VIPs on {} nodes",
        vips.len(),
        owners
    ));
    let moved = changes.lock().unwrap().clone();
    ensure!(
        moved.is_empty(),
        "IPs changed on the way to ferrolb: {moved:#?}"
    );
    prober.next_step();

    // And back to MetalLB.
    scale(&c, cluster::NAMESPACE, "ferrolb-controller", 0)?;
    rt.block_on(pods_gone(
        &c,
        cluster::NAMESPACE,
        "app.kubernetes.io/component=controller",
    ))?;
    scale(&c, METALLB_NS, "metallb-controller", 1)?;
    c.kubectl(
        &[
            "-n",
            METALLB_NS,
            "rollout",
            "status",
            "deployment/metallb-controller",
            "--timeout=3m",
        ],
        None,
    )?;
    prober.next_step();
    let mut upgrade = vec![
        "upgrade",
        "metallb",
        metallb_chart.to_str().unwrap(),
        "-n",
        METALLB_NS,
        "--wait",
        "--timeout",
        "5m",
    ];
    upgrade.extend(metallb_values.iter().map(String::as_str));
    c.helm(&upgrade)?;
    prober.next_step();
    c.helm(&[
        "uninstall",
        cluster::RELEASE,
        "-n",
        cluster::NAMESPACE,
        "--wait",
        "--timeout",
        "3m",
    ])?;
    rt.block_on(pods_gone(
        &c,
        cluster::NAMESPACE,
        "app.kubernetes.io/name=ferrolb",
    ))?;
    let owners = rt.block_on(poll(
        "MetalLB alone to answer for every VIP",
        DEADLINE,
        || async { one_answer_each(&c, &vips).ok() },
    ))?;
    report.line(format!(
        "back on MetalLB: every VIP answered by one MAC ({owners} nodes)"
    ));
    let figures = prober.stop()?;
    watch.abort();
    let moved = changes.lock().unwrap().clone();
    ensure!(moved.is_empty(), "IPs changed: {moved:#?}");
    let after = rt.block_on(all_ips(&c))?;
    ensure!(after == before, "the Services' IPs differ at the end");

    report.line(format!(
        "{SERVICES} Services, {} VIPs: no IP changed at any moment (watched)",
        vips.len()
    ));
    for line in figures {
        report.line(line);
    }
    report.print();
    Ok(())
}

/// Three backend Pods in `namespace`, one per node where possible.
fn backend(c: &Cluster, namespace: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web, namespace: {namespace}}}\n\
         spec:\n  replicas: 3\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    \
         spec:\n      terminationGracePeriodSeconds: 1\n      \
         topologySpreadConstraints: [{{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {{matchLabels: {{app: web}}}}}}]\n      \
         containers: [{{name: web, image: {}, imagePullPolicy: IfNotPresent, args: [netexec, --http-port=8080], ports: [{{containerPort: 8080}}], \
         readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}}}]\n",
        c.backend_image
    )
}

fn service(namespace: &str, name: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         spec: {{type: LoadBalancer, selector: {{app: web}}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
    )
}

fn in_range(ip: &IpAddr, range: &[std::net::Ipv4Addr]) -> bool {
    matches!(ip, IpAddr::V4(v4) if range.contains(v4))
}

/// Every LoadBalancer Service's IPs, by `namespace/name`, for those that have some.
async fn all_ips(c: &Cluster) -> Result<BTreeMap<String, Vec<IpAddr>>> {
    let mut out = BTreeMap::new();
    for ns in NAMESPACES {
        let api: Api<Service> = Api::namespaced(c.client().await?, ns);
        for svc in api.list(&ListParams::default()).await?.items {
            let ips = ferrolb_allocator::input::ingress_ips(&svc);
            if !ips.is_empty() {
                out.insert(
                    format!("{ns}/{}", svc.metadata.name.unwrap_or_default()),
                    ips,
                );
            }
        }
    }
    Ok(out)
}

/// Watches every Service and records each change of IPs from `before`.
async fn watch_ips(
    client: kube::Client,
    before: BTreeMap<String, Vec<IpAddr>>,
    changes: Arc<Mutex<Vec<String>>>,
) {
    let api: Api<Service> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default())
        .applied_objects()
        .boxed();
    while let Some(event) = events.next().await {
        let Ok(svc) = event else { continue };
        let key = format!(
            "{}/{}",
            svc.metadata.namespace.as_deref().unwrap_or_default(),
            svc.metadata.name.as_deref().unwrap_or_default()
        );
        let Some(was) = before.get(&key) else {
            continue;
        };
        let now = ferrolb_allocator::input::ingress_ips(&svc);
        if &now != was {
            changes
                .lock()
                .unwrap()
                .push(format!("{key}: {was:?} -> {now:?}"));
        }
    }
}

/// The assigned IPv4 count of each ferrolb pool.
fn pool_counts(c: &Cluster) -> Result<BTreeMap<String, usize>> {
    let out = c.kubectl(
        &[
            "get",
            "ipaddresspools.ferrolb.io",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name}={.status.assignedIPv4}{\"\\n\"}{end}",
        ],
        None,
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let (name, n) = l.split_once('=')?;
            Some((name.to_string(), n.parse().ok()?))
        })
        .collect())
}

/// Each IP's ferrolb condition: reason and message.
async fn conditions(c: &Cluster) -> Result<BTreeMap<IpAddr, (String, String)>> {
    let mut out = BTreeMap::new();
    for ns in NAMESPACES {
        let api: Api<Service> = Api::namespaced(c.client().await?, ns);
        for svc in api.list(&ListParams::default()).await?.items {
            let ips = ferrolb_allocator::input::ingress_ips(&svc);
            let conditions = svc.status.and_then(|s| s.conditions).unwrap_or_default();
            for ip in ips {
                if let Some(c) = conditions.iter().find(|c| {
                    c.type_ == "ferrolb.io/AnnouncedIPv4"
                        && c.message.starts_with(&format!("{ip} "))
                }) {
                    out.insert(ip, (c.reason.clone(), c.message.clone()));
                }
            }
        }
    }
    Ok(out)
}

/// Each node's MAC, as its address answers ARP.
fn node_macs(
    c: &Cluster,
    nodes: &[(String, std::net::Ipv4Addr)],
) -> Result<Vec<(String, [u8; 6])>> {
    nodes
        .iter()
        .map(|(name, ip)| {
            let macs = client::arping(&c.client, IpAddr::V4(*ip), client::ARP_POLL)?;
            let [mac] = macs.as_slice() else {
                bail!("{name} ({ip}) is answered by {macs:02x?}");
            };
            Ok((name.clone(), *mac))
        })
        .collect()
}

/// How many of the Services' IPs ferrolb's condition calls announced.
async fn announced(c: &Cluster) -> Result<usize> {
    let mut n = 0;
    for ns in NAMESPACES {
        let api: Api<Service> = Api::namespaced(c.client().await?, ns);
        for svc in api.list(&ListParams::default()).await?.items {
            n += svc
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .filter(|c| c.type_ == "ferrolb.io/AnnouncedIPv4" && c.status == "True")
                .count();
        }
    }
    Ok(n)
}

/// Checks that exactly one MAC answers ARP for each VIP; how many different MACs
/// (nodes) answer in all.
fn one_answer_each(c: &Cluster, vips: &[(String, IpAddr)]) -> Result<usize> {
    let mut macs = std::collections::BTreeSet::new();
    for ((name, vip), answers) in vips.iter().zip(arping_all(c, vips)?) {
        let [mac] = answers.as_slice() else {
            bail!("{name} ({vip}) is answered by {answers:02x?}");
        };
        macs.insert(*mac);
    }
    Ok(macs.len())
}

/// The distinct MACs that answer one ARP request for each VIP within half a second
/// (MetalLB's speaker answers late while busy), ten requests at a time. Where ferrolb and
/// MetalLB answer from the same node, that is one MAC.
fn arping_all(c: &Cluster, vips: &[(String, IpAddr)]) -> Result<Vec<Vec<[u8; 6]>>> {
    let mut out = Vec::with_capacity(vips.len());
    for chunk in vips.chunks(10) {
        let answers: Vec<Result<Vec<[u8; 6]>>> = std::thread::scope(|s| {
            let threads: Vec<_> = chunk
                .iter()
                .map(|(_, vip)| {
                    s.spawn(move || client::arping(&c.client, *vip, Duration::from_millis(500)))
                })
                .collect();
            threads
                .into_iter()
                .map(|t| {
                    t.join()
                        .unwrap_or_else(|_| bail!("an arping thread panicked"))
                })
                .collect()
        });
        for a in answers {
            let mut macs = a?;
            macs.sort();
            macs.dedup();
            out.push(macs);
        }
    }
    Ok(out)
}

async fn pods_gone(c: &Cluster, namespace: &str, labels: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(c.client().await?, namespace);
    poll(
        &format!("the Pods {labels} in {namespace} to be gone"),
        DEADLINE,
        || async {
            pods.list(&ListParams::default().labels(labels))
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        },
    )
    .await
}

/// The client's view: new TCP connections to every VIP in turn, on a thread in the
/// client's network namespace, until stopped. Per step: the longest any VIP went
/// without a successful connection, and the connections that failed.
struct Prober {
    step: Arc<AtomicUsize>,
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Result<Vec<Step>>>,
}

#[derive(Default, Clone)]
struct Step {
    tries: u32,
    failed: u32,
    /// The longest gap between two successful connections to one VIP, and that VIP.
    longest: (Duration, Option<IpAddr>),
    /// The longest time one round over every VIP took (the resolution of the gaps).
    round: Duration,
    /// The VIPs that failed, with how often, and how.
    failing: BTreeMap<IpAddr, (u32, std::collections::BTreeSet<String>)>,
}

impl Prober {
    fn start(from: &Netns, vips: Vec<IpAddr>) -> Prober {
        let step = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let (s, d, from) = (step.clone(), done.clone(), from.clone());
        let thread = std::thread::spawn(move || from.in_netns(|| probe(&vips, &s, &d)));
        Prober { step, done, thread }
    }

    fn next_step(&self) {
        self.step.fetch_add(1, Ordering::Relaxed);
    }

    /// The figures, a line per step.
    fn stop(self) -> Result<Vec<String>> {
        self.done.store(true, Ordering::Relaxed);
        let steps = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the probing thread panicked"))??;
        Ok(steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let how: std::collections::BTreeSet<&String> =
                    s.failing.values().flat_map(|f| &f.1).collect();
                format!(
                    "client, {:<42} longest without a connection {:>5} ms{}, {} of {} connections failed{} (a round over all VIPs took up to {} ms)",
                    STEPS.get(i).copied().unwrap_or("after"),
                    s.longest.0.as_millis(),
                    s.longest.1.map(|ip| format!(" ({ip})")).unwrap_or_default(),
                    s.failed,
                    s.tries,
                    if s.failing.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} VIPs: {how:?}; {:?})", s.failing.len(), s.failing.iter().map(|(ip, f)| (ip, f.0)).collect::<Vec<_>>())
                    },
                    s.round.as_millis()
                )
            })
            .collect())
    }
}

fn probe(vips: &[IpAddr], step: &AtomicUsize, done: &AtomicBool) -> Vec<Step> {
    let mut steps = vec![Step::default()];
    let mut last_ok: Vec<Instant> = vec![Instant::now(); vips.len()];
    while !done.load(Ordering::Relaxed) {
        let began = Instant::now();
        for (i, vip) in vips.iter().enumerate() {
            let now = step.load(Ordering::Relaxed);
            if steps.len() <= now {
                steps.resize(now + 1, Step::default());
            }
            let s = &mut steps[now];
            s.tries += 1;
            let tried = Instant::now();
            match TcpStream::connect_timeout(&SocketAddr::new(*vip, 80), Duration::from_millis(200))
            {
                Ok(_) => {
                    let gap = tried.duration_since(last_ok[i]);
                    if gap > s.longest.0 {
                        s.longest = (gap, Some(*vip));
                    }
                    last_ok[i] = Instant::now();
                }
                Err(e) => {
                    s.failed += 1;
                    let f = s.failing.entry(*vip).or_default();
                    f.0 += 1;
                    f.1.insert(format!("{:?}", e.kind()));
                }
            }
        }
        let now = step.load(Ordering::Relaxed).min(steps.len() - 1);
        steps[now].round = steps[now].round.max(began.elapsed());
    }
    steps
}

/// `kubectl scale deployment NAME --replicas=N` in `namespace`.
fn scale(c: &Cluster, namespace: &str, name: &str, replicas: u32) -> Result<String> {
    let deployment = format!("deployment/{name}");
    let replicas = format!("--replicas={replicas}");
    c.kubectl(&["-n", namespace, "scale", &deployment, &replicas], None)
}

/// Lines printed together at the end, so they are not lost among the commands' output.
#[derive(Default)]
struct Report(Vec<String>);

impl Report {
    fn line(&mut self, line: String) {
        eprintln!("{line}");
        self.0.push(line);
    }

    fn print(&self) {
        eprintln!("\n== MetalLB -> ferrolb -> MetalLB, real nodes");
        for line in &self.0 {
            eprintln!("  {line}");
        }
    }
}

/// Runs the ferrolb binary: whether it succeeded, its stdout and its stderr.
fn ferrolb(args: &[&str]) -> Result<(bool, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
        .args(args)
        .output()
        .context("running ferrolb")?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Beside MetalLB's speakers: each VIP answered by one MAC, and its ferrolb condition
/// either held back naming that MAC and its node, or announced by that very node. How
/// many of each.
fn beside_metallb(
    vips: &[(String, IpAddr)],
    answering: &[Vec<[u8; 6]>],
    conditions: &BTreeMap<IpAddr, (String, String)>,
    macs: &[(String, [u8; 6])],
) -> Result<(usize, usize)> {
    let (mut held, mut same_node) = (0, 0);
    for ((name, vip), answering) in vips.iter().zip(answering) {
        let [mac] = answering.as_slice() else {
            bail!("{name} ({vip}) is answered by {answering:02x?} while MetalLB still runs");
        };
        let (reason, message) = &conditions[vip];
        let node = macs
            .iter()
            .find(|(_, m)| m == mac)
            .map(|(n, _)| n.as_str())
            .unwrap_or("?");
        if reason == "ConflictingResponder" {
            // The MAC, and the node it belongs to: MetalLB's speaker there.
            ensure!(
                message.contains(&format!(
                    "MAC {} (node {node})",
                    ferrolb_speaker::mac::format(mac)
                )),
                "{name}: {message}, but {} ({node}) answers",
                ferrolb_speaker::mac::format(mac)
            );
            held += 1;
        } else {
            ensure!(
                reason == "NodeAssigned"
                    && message.starts_with(&format!("{vip} is announced by {node} on ")),
                "{name}: {reason}: {message}, but MetalLB answers from {node}"
            );
            same_node += 1;
        }
    }
    Ok((held, same_node))
}
