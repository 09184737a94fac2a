//! A real Kubernetes control plane for ferrolb's tests: etcd, kube-apiserver (RBAC on,
//! ServiceAccount tokens signed by a key of its own) and kube-controller-manager (its
//! EndpointSlice, namespace, garbage-collector and ServiceAccount controllers), each
//! test with its own, on ports of its own, in the manner of controller-runtime's envtest.
//!
//! Why not the kube-rs `envtest` crate: it starts no kube-controller-manager (tests need
//! Kubernetes' own EndpointSlices), it builds controller-runtime into every test build
//! through cgo, and it offers no way to restart the API server mid-test. What is here
//! is small: certificates from rcgen, three processes, readiness polls.
//!
//! There is no kubelet: tests write Node objects and Pod status themselves.
//! Everything is torn down when the [`ControlPlane`] is dropped, also when a test
//! panics; the processes also die with the test process if it is killed, and the next
//! start removes directories that killed runs left behind.

mod assets;
mod pki;
mod process;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::Signal;

pub use assets::{BINARIES, binary, build_script};
pub use pki::Pki;
use process::Supervised;

/// Every control plane's directory is `<temp>/ferrolb-k8s-<pid>-<counter>`.
const DIR_PREFIX: &str = "ferrolb-k8s-";
/// The issuer of ServiceAccount tokens, as in a kubeadm cluster.
pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// ClusterIPs come from here (never routed anywhere: no kube-proxy runs).
pub const SERVICE_CLUSTER_IP_RANGE: &str = "10.96.0.0/16";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How a control plane is started.
#[derive(Clone, Debug)]
pub struct Options {
    /// Addresses, besides loopback, at which clients reach the API server (a lab's
    /// address for it): its serving certificate is made valid for them.
    pub extra_ips: Vec<IpAddr>,
    /// Run kube-controller-manager (EndpointSlices, namespace deletion, garbage
    /// collection, default ServiceAccounts).
    pub controller_manager: bool,
    /// Log every request's metadata to [`ControlPlane::audit_log`], to count API load.
    pub audit: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            extra_ips: Vec::new(),
            controller_manager: true,
            audit: false,
        }
    }
}

/// How long each part took to become ready.
#[derive(Clone, Copy, Debug, Default)]
pub struct Startup {
    pub etcd: Duration,
    pub apiserver: Duration,
    pub controller_manager: Duration,
}

#[derive(Clone, Copy, Debug)]
struct Ports {
    etcd_client: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
}

/// A running control plane. See the [crate docs](crate).
pub struct ControlPlane {
    dir: PathBuf,
    options: Options,
    ports: Ports,
    pki: Pki,
    admin_kubeconfig: PathBuf,
    startup: Startup,
    // Dropped in reverse order of start: controller manager, API server, etcd.
    controller_manager: Option<Supervised>,
    apiserver: Option<Supervised>,
    etcd: Option<Supervised>,
}

impl ControlPlane {
    /// A control plane with default [`Options`].
    pub async fn start() -> Result<ControlPlane> {
        ControlPlane::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Result<ControlPlane> {
        let bin = assets::directory()?;
        remove_stale();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pki = pki::write(&dir.join("pki"), &options.extra_ips)?;
        let ports = free_ports()?;
        let admin_kubeconfig = dir.join("admin.kubeconfig");
        let mut cp = ControlPlane {
            dir,
            options,
            ports,
            pki,
            admin_kubeconfig,
            startup: Startup::default(),
            controller_manager: None,
            apiserver: None,
            etcd: None,
        };
        // From here on, an error drops `cp`, which stops whatever was started.
        write_kubeconfig(
            &cp.admin_kubeconfig,
            &cp.server(),
            &cp.pki.ca_cert,
            User::Certificate {
                cert: &cp.pki.admin_cert,
                key: &cp.pki.admin_key,
            },
        )?;

        let t = Instant::now();
        cp.etcd = Some(Supervised::start(
            "etcd",
            &bin.join("etcd"),
            &cp.etcd_args(),
            &cp.dir.join("etcd.log"),
        )?);
        cp.wait_for_etcd().await?;
        cp.startup.etcd = t.elapsed();

        let t = Instant::now();
        cp.start_apiserver().await?;
        cp.startup.apiserver = t.elapsed();

        if cp.options.controller_manager {
            let t = Instant::now();
            cp.controller_manager = Some(Supervised::start(
                "kube-controller-manager",
                &bin.join("kube-controller-manager"),
                &cp.controller_manager_args(),
                &cp.dir.join("kube-controller-manager.log"),
            )?);
            cp.wait_for_controller_manager().await?;
            cp.startup.controller_manager = t.elapsed();
        }
        eprintln!(
            "control plane in {}: etcd ready in {} ms, kube-apiserver in {} ms, \
             kube-controller-manager in {} ms",
            cp.dir.display(),
            cp.startup.etcd.as_millis(),
            cp.startup.apiserver.as_millis(),
            cp.startup.controller_manager.as_millis()
        );
        Ok(cp)
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.apiserver)
    }

    /// The API server's port on the host's loopback.
    pub fn apiserver_port(&self) -> u16 {
        self.ports.apiserver
    }

    /// A kubeconfig for the cluster admin (group system:masters).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// This control plane's directory (logs, certificates, kubeconfigs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn startup(&self) -> Startup {
        self.startup
    }

    /// The audit log (with [`Options::audit`]): one JSON event per line.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// A client acting as the cluster admin.
    pub async fn client(&self) -> Result<kube::Client> {
        client_for(&self.admin_kubeconfig).await
    }

    /// `kubectl --kubeconfig ADMIN`, ready for arguments.
    pub fn kubectl(&self) -> Result<Command> {
        let mut cmd = Command::new(binary("kubectl")?);
        cmd.arg("--kubeconfig").arg(&self.admin_kubeconfig);
        Ok(cmd)
    }

    /// Runs `kubectl ARGS` as the admin, with `input` on stdin; its stdout, or an error
    /// with its stderr.
    pub fn kubectl_run(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        let output = run(self.kubectl()?.args(args), input)?;
        if !output.status.success() {
            bail!(
                "kubectl {} failed ({}): {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `kubectl apply -f -` of `yaml`, as the admin.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_run(&["apply", "-f", "-"], Some(yaml))
    }

    /// `helm --kubeconfig ADMIN`, with Helm's cache and config kept in this control
    /// plane's directory.
    pub fn helm(&self) -> Result<Command> {
        let mut cmd = Command::new(binary("helm")?);
        let home = self.dir.join("helm");
        cmd.env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .arg("--kubeconfig")
            .arg(&self.admin_kubeconfig);
        Ok(cmd)
    }

    /// A token of ServiceAccount `namespace/name` from the TokenRequest API, valid for
    /// an hour: what a Pod running as that ServiceAccount is given.
    pub async fn token(&self, namespace: &str, name: &str) -> Result<String> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client().await?, namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| format!("requesting a token for ServiceAccount {namespace}/{name}"))?;
        answer
            .status
            .and_then(|s| s.token)
            .context("the TokenRequest came back without a token")
    }

    /// A token of ServiceAccount `namespace/name` bound to its Pod `pod` (as the kubelet
    /// gets for the Pod's containers), valid for an hour: the API server names the Pod's
    /// node in the token's user extra `authentication.kubernetes.io/node-name`.
    pub async fn pod_token(&self, namespace: &str, name: &str, pod: &str) -> Result<String> {
        let client = self.client().await?;
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
        let uid = pods
            .get(pod)
            .await
            .with_context(|| format!("reading Pod {namespace}/{pod}"))?
            .metadata
            .uid;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                bound_object_ref: Some(
                    k8s_openapi::api::authentication::v1::BoundObjectReference {
                        api_version: Some("v1".into()),
                        kind: Some("Pod".into()),
                        name: Some(pod.into()),
                        uid,
                    },
                ),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = accounts
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .with_context(|| {
                format!(
                    "requesting a token for ServiceAccount {namespace}/{name} bound to Pod {pod}"
                )
            })?;
        answer
            .status
            .and_then(|s| s.token)
            .context("the TokenRequest came back without a token")
    }

    /// Writes a kubeconfig that authenticates with `token` against `server` (the API
    /// server's address as the holder reaches it) and returns its path.
    pub fn token_kubeconfig(&self, file_name: &str, server: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(file_name);
        write_kubeconfig(&path, server, &self.pki.ca_cert, User::Token(token))?;
        Ok(path)
    }

    /// Stops the API server (SIGKILL), as an outage would; etcd keeps the state.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut p) = self.apiserver.take() {
            p.stop(Signal::SIGKILL);
        }
    }

    /// Starts the API server again on the same port and waits until it is ready.
    pub async fn start_apiserver(&mut self) -> Result<()> {
        self.stop_apiserver();
        self.apiserver = Some(Supervised::start(
            "kube-apiserver",
            &binary("kube-apiserver")?,
            &self.apiserver_args()?,
            &self.dir.join("kube-apiserver.log"),
        )?);
        self.wait_for_apiserver().await
    }

    fn etcd_args(&self) -> Vec<String> {
        let client = format!("http://127.0.0.1:{}", self.ports.etcd_client);
        let peer = format!("http://127.0.0.1:{}", self.ports.etcd_peer);
        vec![
            "--name=ferrolb".into(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=ferrolb={peer}"),
            // Tests do not survive power loss; they should not wait for disks either.
            "--unsafe-no-fsync".into(),
            "--log-level=warn".into(),
        ]
    }

    fn apiserver_args(&self) -> Result<Vec<String>> {
        let p = &self.pki;
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.ports.etcd_client),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={}", self.ports.apiserver),
            format!("--cert-dir={}", self.dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", p.serving_cert.display()),
            format!("--tls-private-key-file={}", p.serving_key.display()),
            format!("--client-ca-file={}", p.ca_cert.display()),
            format!(
                "--service-account-key-file={}",
                p.service_account_pub.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                p.service_account_key.display()
            ),
            format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
            "--authorization-mode=RBAC".into(),
            format!("--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}"),
            "--allow-privileged=true".into(),
            // No kubelet registers an endpoint for the kubernetes Service here.
            "--endpoint-reconciler-type=none".into(),
            // Pods are written by tests, before any default ServiceAccount may exist.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--profiling=false".into(),
        ];
        if self.options.audit {
            let policy = self.dir.join("audit-policy.yaml");
            std::fs::write(
                &policy,
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n\
                 rules:\n- level: Metadata\n",
            )?;
            args.push(format!("--audit-policy-file={}", policy.display()));
            args.push(format!("--audit-log-path={}", self.audit_log().display()));
            args.push("--audit-log-format=json".into());
            args.push("--audit-log-mode=blocking".into());
            // One file, never rotated (the default rotates at 100 MB, which a benchmark
            // with 10,000 Services passes): counts read from it cover the whole run.
            args.push("--audit-log-maxsize=0".into());
        }
        Ok(args)
    }

    fn controller_manager_args(&self) -> Vec<String> {
        let kubeconfig = self.admin_kubeconfig.display();
        vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", self.ports.controller_manager),
            format!("--cert-dir={}", self.dir.join("kcm-certs").display()),
            "--leader-elect=false".into(),
            "--controllers=endpointslice-controller,endpointslice-mirroring-controller,\
             namespace-controller,garbage-collector-controller,serviceaccount-controller"
                .into(),
            "--use-service-account-credentials=false".into(),
            "--profiling=false".into(),
        ]
    }

    async fn wait_for_etcd(&mut self) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.etcd_client));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            running(&mut self.etcd)?;
            if http_get(addr, "/health").is_some_and(|body| body.contains(r#""health":"true""#)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd was not healthy within 30 s; see {}",
                    self.dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_for_apiserver(&mut self) -> Result<()> {
        let client = self.client().await?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            running(&mut self.apiserver)?;
            let request = http::Request::get("/readyz").body(Vec::new())?;
            let last = match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver was not ready within 90 s (last answer: {last}); see {}",
                    self.dir.join("kube-apiserver.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_controller_manager(&mut self) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.ports.controller_manager));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            running(&mut self.controller_manager)?;
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-controller-manager did not serve within 60 s; see {}",
                    self.dir.join("kube-controller-manager.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for p in [
            &mut self.controller_manager,
            &mut self.apiserver,
            &mut self.etcd,
        ] {
            if let Some(mut p) = p.take() {
                p.stop(Signal::SIGKILL);
            }
        }
        if std::env::var_os("FERROLB_KEEP_CONTROL_PLANE").is_some() {
            eprintln!("control plane kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn running(p: &mut Option<Supervised>) -> Result<()> {
    match p {
        Some(p) => p.check_running(),
        None => bail!("not started"),
    }
}

/// Runs `cmd` to completion with `input` on stdin (closed when `None`).
pub fn run(cmd: &mut Command, input: Option<&str>) -> Result<std::process::Output> {
    use std::io::Write;
    use std::process::Stdio;
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().context("stdin was requested")?;
        // An early exit shows in the status and stderr.
        let _ = stdin.write_all(input.as_bytes());
    }
    Ok(child.wait_with_output()?)
}

/// A client from a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Result<kube::Client> {
    let file = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

enum User<'a> {
    Certificate { cert: &'a Path, key: &'a Path },
    Token(&'a str),
}

/// A kubeconfig (as JSON, which is YAML too) with one cluster, user and context.
fn write_kubeconfig(path: &Path, server: &str, ca: &Path, user: User) -> Result<()> {
    let user = match user {
        User::Certificate { cert, key } => serde_json::json!({
            "client-certificate": cert,
            "client-key": key,
        }),
        User::Token(token) => serde_json::json!({ "token": token }),
    };
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "ferrolb-test", "cluster": {
            "server": server,
            "certificate-authority": ca,
        }}],
        "users": [{"name": "ferrolb-test", "user": user}],
        "contexts": [{"name": "ferrolb-test", "context": {
            "cluster": "ferrolb-test",
            "user": "ferrolb-test",
            "namespace": "default",
        }}],
        "current-context": "ferrolb-test",
    });
    std::fs::write(path, serde_json::to_string_pretty(&config)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Four distinct free ports on loopback (held together while chosen, so they differ).
fn free_ports() -> Result<Ports> {
    let listeners: Vec<TcpListener> = (0..4)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<std::io::Result<_>>()?;
    let port = |i: usize| -> Result<u16> { Ok(listeners[i].local_addr()?.port()) };
    Ok(Ports {
        etcd_client: port(0)?,
        etcd_peer: port(1)?,
        apiserver: port(2)?,
        controller_manager: port(3)?,
    })
}

/// The body of a plain HTTP GET, or None on any failure (for readiness polls).
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200")
        .then_some(())
        .or_else(|| head.starts_with("HTTP/1.1 200").then_some(()))?;
    Some(body.to_string())
}

/// Removes the directories of control planes whose test process is gone (killed before
/// it could clean up; its processes died with it).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
