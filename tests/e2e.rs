//! The end-to-end suite: ferrolb installed with its own Helm chart, running as real Pods
//! on real nodes (kubelet, containerd, kube-proxy), used as a user uses it, from a client
//! on the nodes' network.
//!
//! Without configuration it starts three real nodes with `tests/nodes/up` (root, Go;
//! docs/testing.md) and removes them at the end. `FERROLB_E2E_KUBECONFIG` points it at
//! any other cluster (kind in .github/workflows/kind.yml), with `FERROLB_NODE_SUBNET`
//! (default 172.18.0.0/16, kind's; the chart's pool is `fromNodeNetwork`, the suite's own
//! single-address pools come from below it), `FERROLB_IMAGE` (ferrolb's image, loaded on the
//! nodes), optionally `FERROLB_BACKEND_IMAGE` (default agnhost) and
//! `FERROLB_CLIENT_NETNS` (default: this machine is the client); the cases that reach
//! into a node (kill a container, cut a link, stop a kubelet) need a tests/nodes cluster
//! (`FERROLB_NODES_CLUSTER`, which `up` exports) and are skipped, saying so, elsewhere.
//!
//! The cases run one after another on one installation, in the order below; each prints
//! what it measured. `FERROLB_E2E_ROUNDS` (default 1) repeats every failover that many
//! times. `FERROLB_E2E_KEEP=1` keeps the nodes for a look afterwards.

#[path = "cluster/bench.rs"]
#[allow(dead_code)] // the benchmarks use the rest
mod bench;
#[path = "e2e/client.rs"]
mod client;
#[path = "e2e/cluster.rs"]
mod cluster;

#[path = "e2e/chart.rs"]
mod chart;
#[path = "e2e/failover.rs"]
mod failover;
#[path = "e2e/local.rs"]
mod local;
#[path = "e2e/pool.rs"]
mod pool;
#[path = "e2e/traffic.rs"]
mod traffic;
#[path = "e2e/why.rs"]
mod why;

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use libtest_mimic::{Arguments, Failed, Trial};

use cluster::Cluster;

type Case = fn(&Suite) -> Result<()>;

/// What a case needs besides a cluster: the nodes of tests/nodes, to reach into them.
const NODES: bool = true;
const ANY: bool = false;

/// Every case, in the order they run.
const CASES: &[(&str, Case, bool)] = &[
    (
        "chart::installs_and_runs_as_real_pods",
        chart::installs,
        ANY,
    ),
    (
        "pool::from_node_network_takes_the_top_of_the_node_subnet",
        pool::from_node_network,
        ANY,
    ),
    (
        "traffic::a_service_answers_on_its_external_ip",
        traffic::answers,
        ANY,
    ),
    (
        "traffic::every_proxy_mode_carries_the_vip",
        traffic::every_proxy_mode,
        ANY,
    ),
    (
        "local::announced_only_where_a_local_endpoint_is",
        local::follows_its_endpoint,
        ANY,
    ),
    (
        "failover::speaker_pod_deleted",
        failover::speaker_pod_deleted,
        ANY,
    ),
    (
        "failover::speaker_container_killed",
        failover::speaker_container_killed,
        NODES,
    ),
    ("failover::link_cut", failover::link_cut, NODES),
    (
        "failover::ferrolb_drain_moves_ips_without_losing_connections",
        failover::ferrolb_drain,
        ANY,
    ),
    (
        "failover::kube_proxy_stopped_moves_the_vip",
        failover::kube_proxy_stopped,
        NODES,
    ),
    ("failover::drained", failover::drained, ANY),
    (
        "failover::kubelet_stopped",
        failover::kubelet_stopped,
        NODES,
    ),
    ("chart::upgrade_moves_no_ip", chart::upgrade, ANY),
    (
        "why::explains_real_failures",
        why::explains_real_failures,
        ANY,
    ),
    (
        "chart::uninstall_leaves_nothing_behind",
        chart::uninstall,
        ANY,
    ),
];

/// What the cases share: the cluster, ferrolb installed on it, the backend Service most
/// cases send traffic to.
pub struct Suite {
    pub cluster: Cluster,
    runtime: tokio::runtime::Runtime,
    installed: OnceLock<Result<Duration, String>>,
    web: Mutex<Option<Web>>,
}

/// The Service every failover measures: three backend Pods, one per node where possible.
#[derive(Clone, Debug)]
pub struct Web {
    pub ips: Vec<IpAddr>,
}

pub const WEB_NAMESPACE: &str = "e2e-web";

impl Suite {
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// ferrolb installed by its chart (once; later calls return the first outcome):
    /// how long `helm install --wait` took.
    pub fn installed(&self) -> Result<Duration> {
        self.installed
            .get_or_init(|| chart::install(self).map_err(|e| format!("{e:#}")))
            .clone()
            .map_err(|e| anyhow!("installing the chart failed: {e}"))
    }

    /// The backend Service, created by the first case that needs it.
    pub fn web(&self) -> Result<Web> {
        let mut web = self.web.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = web.as_ref() {
            return Ok(w.clone());
        }
        self.installed()?;
        let (w, took) = traffic::create_web(self)?;
        eprintln!(
            "    Service {WEB_NAMESPACE}/web: {} answering {} ms after its creation",
            w.ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" and "),
            took.as_millis()
        );
        *web = Some(w.clone());
        Ok(w)
    }

    /// The number of times each failover is repeated.
    pub fn rounds(&self) -> usize {
        std::env::var("FERROLB_E2E_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .filter(|r| *r > 0)
            .unwrap_or(1)
    }
}

/// A Deployment of the backend image: `replicas` Pods labelled `app: NAME`, spread over
/// the nodes, serving HTTP on `port` (Ready only when that is 8080, where the readiness
/// probe looks), with `pod_spec` (lines indented for the Pod spec) added.
pub fn backend(
    suite: &Suite,
    namespace: &str,
    name: &str,
    replicas: u32,
    port: u16,
    pod_spec: &str,
) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway, labelSelector: {{matchLabels: {{app: {name}}}}}}}
{pod_spec}
      containers:
      - name: backend
        image: {image}
        imagePullPolicy: IfNotPresent
        args: [netexec, --http-port={port}]
        ports: [{{containerPort: 8080}}]
        env:
        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        - {{name: NODE_NAME, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}
        readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 1}}
"#,
        image = suite.cluster.backend_image
    )
}

/// A LoadBalancer Service on port 80 for the Pods labelled `app: SELECTOR`, dual-stack
/// where the cluster is.
pub fn load_balancer(
    namespace: &str,
    name: &str,
    selector: &str,
    spec: &str,
    annotations: &str,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}, annotations: {{{annotations}}}}}\n\
         spec:\n  type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n  selector: {{app: {selector}}}\n  \
         ports: [{{port: 80, targetPort: 8080}}]\n{spec}\n"
    )
}

pub fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n")
}

/// Prints a case's figures under its name, as the test runner shows them.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => { eprintln!("    {}", format!($($arg)*)) };
}

fn main() -> ExitCode {
    let mut args = Arguments::from_args();
    // One cluster, one installation, failovers measured one at a time.
    args.test_threads = Some(1);
    let names: Vec<&str> = CASES.iter().map(|(n, _, _)| *n).collect();
    let selected = names.iter().any(|n| selected(&args, n));
    if args.list || !selected {
        let trials = names.iter().map(|n| Trial::test(*n, || Ok(()))).collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }
    let started = Instant::now();
    let suite: Arc<Result<Suite, String>> = Arc::new(
        Cluster::acquire()
            .and_then(|cluster| {
                Ok(Suite {
                    cluster,
                    runtime: tokio::runtime::Runtime::new()?,
                    installed: OnceLock::new(),
                    web: Mutex::new(None),
                })
            })
            .map_err(|e| format!("{e:#}")),
    );
    let no_nodes = matches!(suite.as_ref(), Ok(s) if s.cluster.nodes.is_none());
    if no_nodes {
        eprintln!(
            "not a tests/nodes cluster (FERROLB_NODES_CLUSTER unset): the cases that reach into a node are ignored"
        );
    }
    let trials = CASES
        .iter()
        .map(|(name, case, needs_nodes)| {
            let suite = suite.clone();
            let case = *case;
            Trial::test(*name, move || match suite.as_ref() {
                Ok(s) => case(s).map_err(|e| Failed::from(format!("{e:#}"))),
                Err(e) => Err(Failed::from(format!("no cluster to run on: {e}"))),
            })
            .with_ignored_flag(*needs_nodes && no_nodes)
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    drop(suite); // tests/nodes/down
    eprintln!("e2e suite done in {:.0} s", started.elapsed().as_secs_f64());
    conclusion.exit_code()
}

/// Whether libtest's filter arguments select the case `name` (so that a filtered run of
/// other tests starts no cluster).
fn selected(args: &Arguments, name: &str) -> bool {
    let matches = |pattern: &str| {
        if args.exact {
            name == pattern
        } else {
            name.contains(pattern)
        }
    };
    if args.skip.iter().any(|s| matches(s)) {
        return false;
    }
    if args.ignored {
        return false;
    }
    args.filter.as_deref().is_none_or(matches)
}
