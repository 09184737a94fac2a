//! The cluster the suite runs against: one that `tests/nodes/up` starts for it (and
//! `tests/nodes/down` removes), or any cluster given by `FERROLB_E2E_KUBECONFIG`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrolb::lab::Netns;
use ipnetwork::{Ipv4Network, Ipv6Network};
use k8s_openapi::api::core::v1::{Node, Service};
use kube::Api;
use kube::api::ListParams;

pub const NAMESPACE: &str = "ferrolb-system";
pub const RELEASE: &str = "ferrolb";
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/ferrolb");
const NODES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nodes");

/// A cluster with nodes, a client that reaches their network, and ferrolb's image on
/// every node.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    /// Where the client's traffic starts (the namespace of `tests/nodes/up`, or this
    /// machine for kind).
    pub client: Netns,
    pub subnet4: Ipv4Network,
    pub subnet6: Option<Ipv6Network>,
    /// ferrolb's image, `repository:tag`.
    pub image: String,
    pub backend_image: String,
    /// The `tests/nodes` cluster's name, when the suite may reach into its nodes (stop a
    /// kubelet, cut a link, kill a container).
    pub nodes: Option<String>,
    /// kube-proxy's mode on each node, in node order (tests/nodes only).
    pub proxy_modes: Vec<String>,
    /// Started by the suite: removed again when dropped.
    started: bool,
}

impl Cluster {
    /// The cluster of `FERROLB_E2E_KUBECONFIG`, or a new `tests/nodes` cluster.
    pub fn acquire() -> Result<Cluster> {
        match std::env::var_os("FERROLB_E2E_KUBECONFIG").filter(|v| !v.is_empty()) {
            Some(kubeconfig) => Cluster::external(PathBuf::from(kubeconfig)),
            None => Cluster::start(),
        }
    }

    fn external(kubeconfig: PathBuf) -> Result<Cluster> {
        let var = |name: &str, example: &str| {
            std::env::var(name).with_context(|| {
                format!("{name} is not set: with FERROLB_E2E_KUBECONFIG the suite needs it ({name}={example})")
            })
        };
        let nodes = std::env::var("FERROLB_NODES_CLUSTER").ok();
        let proxy_modes = match &nodes {
            Some(name) => read_proxy_modes(name)?,
            None => Vec::new(),
        };
        Ok(Cluster {
            kubeconfig,
            client: match std::env::var("FERROLB_CLIENT_NETNS") {
                Ok(ns) if !ns.is_empty() => Netns::named(&ns),
                _ => Netns::current(),
            },
            subnet4: var("FERROLB_NODE_SUBNET", "172.18.0.0/16")?
                .parse()
                .context("FERROLB_NODE_SUBNET")?,
            subnet6: match std::env::var("FERROLB_NODE_SUBNET6") {
                Ok(s) if !s.is_empty() => Some(s.parse().context("FERROLB_NODE_SUBNET6")?),
                _ => None,
            },
            image: var("FERROLB_IMAGE", "ghcr.io/ferrolb/ferrolb:e2e")?,
            backend_image: std::env::var("FERROLB_BACKEND_IMAGE")
                .unwrap_or_else(|_| "registry.k8s.io/e2e-test-images/agnhost:2.53".into()),
            nodes,
            proxy_modes,
            started: false,
        })
    }

    /// `tests/nodes/up` with three nodes, kube-proxy in every mode this kernel has.
    fn start() -> Result<Cluster> {
        let name = format!("e2e{}", std::process::id() % 100_000);
        let modes = std::env::var("FERROLB_E2E_PROXY_MODES").unwrap_or_else(|_| {
            let mut modes = vec!["iptables", "nftables"];
            if Path::new("/proc/net/ip_vs").exists() {
                modes.push("ipvs");
            }
            modes.join(",")
        });
        Cluster::up(&name, &["--nodes", "3", "--proxy-mode", &modes])
    }

    /// A new cluster: `tests/nodes/up --name NAME ARGS`, removed again when dropped.
    pub fn up(name: &str, args: &[&str]) -> Result<Cluster> {
        eprintln!(
            "starting real nodes: tests/nodes/up --name {name} {}",
            args.join(" ")
        );
        let started = Instant::now();
        let out = Command::new("bash")
            .arg(Path::new(NODES_DIR).join("up"))
            .args(["--name", name])
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .context("running tests/nodes/up")?;
        // From here on `down` runs even if parsing fails.
        let mut cluster = Cluster {
            kubeconfig: PathBuf::new(),
            client: Netns::current(),
            subnet4: Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0)?,
            subnet6: None,
            image: String::new(),
            backend_image: String::new(),
            nodes: Some(name.to_string()),
            proxy_modes: Vec::new(),
            started: true,
        };
        if !out.status.success() {
            bail!(
                "tests/nodes/up --name {name} failed ({}); its output is above",
                out.status
            );
        }
        let exports: BTreeMap<String, String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let get = |k: &str| {
            exports
                .get(k)
                .cloned()
                .with_context(|| format!("tests/nodes/up printed no {k}"))
        };
        cluster.proxy_modes = read_proxy_modes(name)?;
        cluster.kubeconfig = PathBuf::from(get("KUBECONFIG")?);
        cluster.client = Netns::named(&get("FERROLB_CLIENT_NETNS")?);
        cluster.subnet4 = get("FERROLB_NODE_SUBNET")?.parse()?;
        cluster.subnet6 = exports
            .get("FERROLB_NODE_SUBNET6")
            .map(|s| s.parse())
            .transpose()?;
        cluster.image = get("FERROLB_IMAGE")?;
        cluster.backend_image = get("FERROLB_BACKEND_IMAGE")?;
        eprintln!(
            "real nodes up in {:.1} s (tests/nodes/up, builds included)",
            started.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    pub async fn client(&self) -> Result<kube::Client> {
        ferrolb_control_plane::client_for(&self.kubeconfig).await
    }

    /// Runs `kubectl ARGS` (with `input` on stdin); its stdout.
    pub fn kubectl(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        let mut cmd = Command::new(ferrolb_control_plane::binary("kubectl")?);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        checked(&mut cmd, input, &format!("kubectl {}", args.join(" ")))
    }

    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl(&["apply", "-f", "-"], Some(yaml))
    }

    /// Runs `helm ARGS` against the cluster, with Helm's own files kept apart.
    pub fn helm(&self, args: &[&str]) -> Result<String> {
        let home = std::env::temp_dir().join(format!("ferrolb-e2e-helm-{}", std::process::id()));
        let mut cmd = Command::new(ferrolb_control_plane::binary("helm")?);
        cmd.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args);
        let result = checked(&mut cmd, None, &format!("helm {}", args.join(" ")));
        // A `--wait` that timed out says only "not ready": say what the Pods are doing.
        match (&result, args.contains(&"--wait")) {
            (Err(e), true) => {
                let ns = args
                    .iter()
                    .position(|a| *a == "-n" || *a == "--namespace")
                    .and_then(|i| args.get(i + 1))
                    .copied()
                    .unwrap_or("default");
                bail!("{e:#}\n{}", self.pods_in(ns))
            }
            _ => result,
        }
    }

    /// What the Pods of `ns` are doing: their status, the namespace's Events and the last
    /// log lines of every container, for a failure message. Never fails: a part it cannot
    /// read says so.
    pub fn pods_in(&self, ns: &str) -> String {
        let part = |title: &str, args: &[&str]| match self.kubectl(args, None) {
            Ok(out) => format!("--- {title}:\n{}", out.trim_end()),
            Err(e) => format!("--- {title}: {e:#}"),
        };
        let mut report = vec![
            part(
                &format!("Pods in {ns}"),
                &["get", "pods", "-n", ns, "-o", "wide"],
            ),
            part(
                &format!("Events in {ns}"),
                &["get", "events", "-n", ns, "--sort-by=.lastTimestamp"],
            ),
        ];
        let names = self
            .kubectl(&["get", "pods", "-n", ns, "-o", "name"], None)
            .unwrap_or_default();
        for pod in names.lines().take(10) {
            report.push(part(
                &format!("last log lines of {pod}"),
                &["logs", "-n", ns, pod, "--all-containers", "--tail", "15"],
            ));
        }
        report.join("\n")
    }

    /// `tests/nodes/node --name NAME NODE ARGS`: something done to a real node.
    pub fn node(&self, node: &str, args: &[&str]) -> Result<String> {
        let Some(name) = &self.nodes else {
            bail!("this needs the nodes of tests/nodes (FERROLB_NODES_CLUSTER)");
        };
        let mut cmd = Command::new("bash");
        cmd.arg(Path::new(NODES_DIR).join("node"))
            .args(["--name", name, node])
            .args(args);
        checked(
            &mut cmd,
            None,
            &format!("tests/nodes/node {node} {}", args.join(" ")),
        )
    }

    /// The nodes' names and InternalIPv4s, in name order.
    pub async fn node_ips(&self) -> Result<Vec<(String, Ipv4Addr)>> {
        self.nodes_where(|_| true).await
    }

    /// The nodes that take workloads and may announce: no taint that repels Pods, no
    /// `node.kubernetes.io/exclude-from-external-load-balancers` (kind's control plane has
    /// both).
    pub async fn workers(&self) -> Result<Vec<(String, Ipv4Addr)>> {
        self.nodes_where(|n| {
            let excluded = n.metadata.labels.as_ref().is_some_and(|l| {
                l.contains_key("node.kubernetes.io/exclude-from-external-load-balancers")
            });
            let tainted = n
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|t| t.iter().any(|t| t.effect != "PreferNoSchedule"));
            !excluded && !tainted
        })
        .await
    }

    async fn nodes_where(&self, keep: impl Fn(&Node) -> bool) -> Result<Vec<(String, Ipv4Addr)>> {
        let nodes = Api::<Node>::all(self.client().await?)
            .list(&ListParams::default())
            .await?;
        let mut out: Vec<(String, Ipv4Addr)> = nodes
            .items
            .iter()
            .filter(|n| keep(n))
            .filter_map(|n| {
                let ip = n
                    .status
                    .as_ref()?
                    .addresses
                    .as_ref()?
                    .iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .find_map(|a| a.address.parse::<Ipv4Addr>().ok())?;
                Some((n.metadata.name.clone()?, ip))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// `count` IPv4 addresses near the top of the node subnet, below the last
    /// `skip_from_top` usable ones: where the suite's pools come from.
    pub fn top4(&self, skip_from_top: u32, count: u32) -> Vec<Ipv4Addr> {
        let last = u32::from(self.subnet4.broadcast()) - 1 - skip_from_top;
        (0..count).map(|i| Ipv4Addr::from(last - i)).rev().collect()
    }

    /// Like [`Cluster::top4`], in the IPv6 subnet (a block far above the nodes' own).
    pub fn top6(&self, skip_from_top: u32, count: u32) -> Vec<Ipv6Addr> {
        let Some(net) = self.subnet6 else {
            return Vec::new();
        };
        let base = u128::from(net.network()) + 0xffff_0000;
        let last = base + 0xfff - u128::from(skip_from_top);
        (0..count)
            .map(|i| Ipv6Addr::from(last - u128::from(i)))
            .rev()
            .collect()
    }

    /// The IPs a Service holds, once the controller has given it one of each family
    /// it asks for (`families`).
    pub async fn wait_ips(
        &self,
        namespace: &str,
        name: &str,
        families: usize,
    ) -> Result<Vec<IpAddr>> {
        let api: Api<Service> = Api::namespaced(self.client().await?, namespace);
        poll(
            &format!("{namespace}/{name} to get its EXTERNAL-IPs"),
            DEADLINE,
            || async {
                let svc = api.get(name).await.ok()?;
                let ips = ferrolb_allocator::input::ingress_ips(&svc);
                (ips.len() >= families).then_some(ips)
            },
        )
        .await
    }

    /// The node the Service's condition says announces `ip`.
    pub async fn announcer(
        &self,
        namespace: &str,
        name: &str,
        ip: IpAddr,
    ) -> Result<Option<String>> {
        let api: Api<Service> = Api::namespaced(self.client().await?, namespace);
        let svc = api.get(name).await?;
        let prefix = format!("{ip} is announced by ");
        Ok(svc
            .status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .filter(|c| c.status == "True")
            .find_map(|c| {
                let rest = c.message.strip_prefix(&prefix)?;
                Some(rest.split(" on ").next()?.to_string())
            }))
    }

    /// Removes what `tests/nodes/up` made, unless FERROLB_E2E_KEEP is set.
    fn stop(&mut self) {
        let Some(name) = self.nodes.as_ref().filter(|_| self.started) else {
            return;
        };
        if std::env::var_os("FERROLB_E2E_KEEP").is_some() {
            eprintln!(
                "kept the real nodes (FERROLB_E2E_KEEP): export KUBECONFIG={}; \
                 remove them with tests/nodes/down --name {name}",
                self.kubeconfig.display()
            );
            return;
        }
        let status = Command::new("bash")
            .arg(Path::new(NODES_DIR).join("down"))
            .args(["--name", name])
            .stdin(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            eprintln!("tests/nodes/down --name {name} failed: {status:?}");
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// kube-proxy's mode on each node of a tests/nodes cluster, as `up` recorded it.
fn read_proxy_modes(name: &str) -> Result<Vec<String>> {
    let dir =
        std::env::var("FERROLB_NODES_DIR").unwrap_or_else(|_| "/var/tmp/ferrolb-nodes".into());
    let env = std::fs::read_to_string(Path::new(&dir).join(name).join("cluster.env"))
        .with_context(|| format!("FERROLB_NODES_CLUSTER={name}: no such tests/nodes cluster"))?;
    Ok(env
        .lines()
        .find_map(|l| l.strip_prefix("proxy_modes="))
        .unwrap_or("iptables")
        .split(',')
        .map(String::from)
        .collect())
}

/// How long the suite waits for anything the cluster should do by itself.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// Polls `f` every 100 ms until it gives a value, or fails after `deadline`.
pub async fn poll<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > deadline {
            bail!(
                "timed out after {} s waiting for {what}",
                deadline.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `cmd` with `input`; its stdout, or an error naming `what` with its stderr.
fn checked(cmd: &mut Command, input: Option<&str>, what: &str) -> Result<String> {
    let out = ferrolb_control_plane::run(cmd, input)?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// MetalLB's binaries, images and chart, built from its Go module by
/// tests/metallb/build (cached): their directory, named after the version.
#[allow(dead_code)] // for tests/migration.rs and the benchmarks, not the e2e suite
pub fn build_metallb() -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/metallb/build"))
        .stderr(Stdio::inherit())
        .output()
        .context("running tests/metallb/build")?;
    if !out.status.success() {
        bail!(
            "tests/metallb/build failed ({}); its output is above",
            out.status
        );
    }
    let dir = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(dir.lines().last().unwrap_or_default()))
}
