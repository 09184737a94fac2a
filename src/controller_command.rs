//! `ferrolb controller`: assigns external IPs to LoadBalancer Services in a cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use ferrolb_controller::kubernetes::{LeaseOptions, Options};

use crate::logging::{self, LogFormat};

#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    /// Kubeconfig to use; without it, $KUBECONFIG, ~/.kube/config, or the Pod's
    /// ServiceAccount (in-cluster), as kubectl finds its cluster.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The spec.loadBalancerClass served besides Services with no class. Services of any
    /// other class are never touched.
    #[arg(long, default_value = ferrolb_api::annotations::LOAD_BALANCER_CLASS)]
    load_balancer_class: String,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "0.0.0.0:7472", value_parser = ferrolb_kubernetes::http::parse_address)]
    metrics_address: SocketAddr,
    /// Run several replicas with one active at a time, elected through a Lease. With
    /// false, this replica is always active: run exactly one.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// The Lease's name.
    #[arg(long, default_value = "ferrolb-controller")]
    lease_name: String,
    /// ferrolb's namespace: the Lease's, and that of the nodes' NodeAnnouncements;
    /// default: $POD_NAMESPACE, else the Pod's own namespace, else "default".
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Seconds the Lease stays valid after a renewal: how long a standby waits after the
    /// active replica dies.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Seconds before expiry at which the active replica renews.
    #[arg(long, default_value_t = 5)]
    lease_grace: u64,
    /// This replica's name in the Lease and in Events; default: $POD_NAME, else the
    /// host name and process id.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

pub fn run(args: ControllerArgs) -> Result<ExitCode> {
    logging::init(args.log_format);
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let namespace = crate::namespace::own(args.lease_namespace.clone());
    let lease = args.leader_elect.then(|| LeaseOptions {
        name: args.lease_name.clone(),
        namespace: namespace.clone(),
        duration: args.lease_duration,
        grace: args.lease_grace,
    });
    let options = Options {
        class: args.load_balancer_class.clone(),
        metrics_address: args.metrics_address,
        lease,
        identity,
        namespace,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = ferrolb_kubernetes::client::client(args.kubeconfig.as_deref()).await?;
        ferrolb_controller::kubernetes::run(client, options).await
    })?;
    Ok(ExitCode::SUCCESS)
}
