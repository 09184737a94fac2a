//! What the Kubernetes end-to-end tests share: a real control plane with ferrolb's Helm
//! chart installed (`helm install`), `ferrolb controller` processes running with the
//! chart's ServiceAccount token (not as admin), and polling helpers.

#![allow(dead_code)] // each test file uses its own part

pub mod bench;
pub mod lab;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrolb_control_plane::{ControlPlane, Options};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{ListParams, PostParams};

/// The namespace ferrolb is installed in, as with `helm install -n ferrolb-system`.
pub const NAMESPACE: &str = "ferrolb-system";
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/ferrolb");

pub struct Cluster {
    pub cp: ControlPlane,
}

impl Cluster {
    /// A control plane with the CRDs, the ferrolb-system namespace and the chart's RBAC.
    pub async fn start() -> Cluster {
        Cluster::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Cluster {
        let cp = ControlPlane::start_with(options)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        let cluster = Cluster { cp };
        // The chart as users install it: CRDs, RBAC, the membership Secret, and the
        // workloads (which never run here: there is no kubelet; the tests run the same
        // binary with the chart's ServiceAccounts instead).
        cluster.helm(&[
            "install",
            "ferrolb",
            CHART,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
        ]);
        cluster.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=30s",
            "crd/ipaddresspools.ferrolb.io",
            "crd/l2advertisements.ferrolb.io",
            "crd/nodeannouncements.ferrolb.io",
        ]);
        cluster
    }

    /// Runs `helm ARGS` as the admin; its stdout, or a panic with its stderr.
    pub fn helm(&self, args: &[&str]) -> String {
        let out = ferrolb_control_plane::run(self.cp.helm().unwrap().args(args), None).unwrap();
        assert!(
            out.status.success(),
            "helm {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// One template of the chart, rendered as `helm install ferrolb -n ferrolb-system`
    /// would.
    pub fn chart(&self, template: &str) -> String {
        let out = ferrolb_control_plane::run(
            self.cp.helm().unwrap().args([
                "template",
                "ferrolb",
                CHART,
                "--namespace",
                NAMESPACE,
                "--show-only",
                template,
            ]),
            None,
        )
        .unwrap();
        assert!(
            out.status.success(),
            "helm template: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn apply(&self, yaml: &str) -> String {
        self.cp.apply(yaml).unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.cp
            .kubectl_run(args, None)
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn client(&self) -> kube::Client {
        self.cp.client().await.unwrap()
    }

    /// A kubeconfig holding a fresh token of the controller's ServiceAccount.
    pub async fn controller_kubeconfig(&self) -> PathBuf {
        let token = self
            .cp
            .token(NAMESPACE, "ferrolb-controller")
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        self.cp
            .token_kubeconfig("controller.kubeconfig", &self.cp.server(), &token)
            .unwrap()
    }

    /// Starts `ferrolb controller` as the chart's ServiceAccount, with leader election
    /// in ferrolb-system under `identity`.
    pub async fn controller(&self, identity: &str, extra: &[&str]) -> Controller {
        let kubeconfig = self.controller_kubeconfig().await;
        Controller::start(&kubeconfig, self.cp.dir(), identity, extra)
    }

    /// Services' ingress IPs, by name, in `namespace`.
    pub async fn ips(&self, namespace: &str) -> BTreeMap<String, Vec<IpAddr>> {
        let api: Api<Service> = Api::namespaced(self.client().await, namespace);
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .map(|s| {
                (
                    s.metadata.name.clone().unwrap(),
                    ferrolb_allocator::input::ingress_ips(s),
                )
            })
            .collect()
    }

    /// Creates LoadBalancer Services `prefix-0` … in `namespace`, `parallel` at a time.
    pub async fn create_services(&self, namespace: &str, prefix: &str, count: usize) {
        use futures::StreamExt;
        let api: Api<Service> = Api::namespaced(self.client().await, namespace);
        futures::stream::iter(0..count)
            .map(|i| {
                let api = api.clone();
                async move {
                    api.create(
                        &PostParams::default(),
                        &load_balancer(&format!("{prefix}-{i}"), &[]),
                    )
                    .await
                    .unwrap()
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
    }

    /// Reasons of the Events about one object, oldest first.
    pub fn event_reasons(&self, namespace: &str, name: &str) -> Vec<String> {
        let out = self.kubectl(&[
            "get",
            "events",
            "-n",
            namespace,
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "--sort-by=.metadata.creationTimestamp",
            "-o",
            "jsonpath={range .items[*]}{.reason}{\"\\n\"}{end}",
        ]);
        out.lines().map(str::to_string).collect()
    }
}

/// A LoadBalancer Service on port 80 with these annotations.
pub fn load_balancer(name: &str, annotations: &[(&str, &str)]) -> Service {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "annotations": annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        },
        "spec": {
            "type": "LoadBalancer",
            "ports": [{"port": 80, "targetPort": 8080}],
            "selector": {"app": name},
        },
    }))
    .unwrap()
}

/// A pool manifest.
pub fn pool(name: &str, addresses: &[&str]) -> String {
    format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: {name}}}\n\
         spec: {{addresses: {addresses:?}}}\n"
    )
}

/// A running `ferrolb controller`, killed when dropped.
pub struct Controller {
    child: Child,
    pub identity: String,
    pub log: PathBuf,
    pub metrics: SocketAddr,
}

impl Controller {
    pub fn start(kubeconfig: &Path, dir: &Path, identity: &str, extra: &[&str]) -> Controller {
        use std::os::unix::process::CommandExt;
        let metrics = free_port();
        let log = dir.join(format!("controller-{identity}-{}.log", unique()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrolb"));
        cmd.arg("controller")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--lease-namespace", NAMESPACE, "--identity", identity])
            .arg("--metrics-address")
            .arg(metrics.to_string())
            .args(extra)
            .env("RUST_LOG", "info,ferrolb_controller=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .process_group(0);
        // SAFETY: prctl only, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().unwrap();
        Controller {
            child,
            identity: identity.to_string(),
            log,
            metrics,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: a crash, no Lease release.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status once it has exited.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path of the metrics server: (status code, body); None when it does not answer.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect_timeout(&self.metrics, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_string()))
    }

    /// The value of one metric line (name with labels, as exposed), if present.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics")?;
        body.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    pub async fn wait_ready(&self) {
        eventually(
            Duration::from_secs(30),
            "the controller's /readyz",
            || async {
                self.http_get("/readyz")
                    .filter(|(c, _)| *c == 200)
                    .map(drop)
            },
        )
        .await;
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- controller {} log ---\n{}", self.identity, self.logs());
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

pub fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `deadline` naming `what`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_or(deadline, what, || {
        let attempt = f();
        async move { attempt.await.ok_or_else(String::new) }
    })
    .await
}

/// [`eventually`] for a wait whose failure should say what was seen: `f` returns
/// `Err(seen)` until it succeeds, and the last `seen` goes in the panic message.
pub async fn eventually_or<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        let seen = match f().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}{}",
            if seen.is_empty() {
                String::new()
            } else {
                format!(" (last seen: {seen})")
            }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
