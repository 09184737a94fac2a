//! `ferrolb`: one binary for every part of ferrolb.

mod controller_command;
mod files;
mod logging;
mod plan;
mod why;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferrolb",
    version,
    about = "LoadBalancer IPs for bare-metal Kubernetes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show which external IP each LoadBalancer Service would get, with no cluster.
    ///
    /// Reads IPAddressPools, Services (with or without status) and Namespaces from YAML
    /// files or directories, runs the allocator and prints, per Service, its IPs and
    /// pool or why it stays pending, then each pool's assigned and available counts.
    /// New Services get the lowest free address, as the in-cluster controller gives.
    /// Exits 1 when any input is invalid (the rest is still planned and printed).
    Plan {
        /// A YAML file or a directory of them (repeatable; `-` reads standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = plan::Format::Table)]
        output: plan::Format,
        /// Predict standalone speakers (`ferrolb speaker --manifests`) instead of the
        /// controller: each new Service starts at a point of the pool hashed from its name.
        #[arg(long)]
        standalone: bool,
    },
    /// Assign external IPs to LoadBalancer Services in a cluster.
    ///
    /// Watches Services, IPAddressPools and Namespaces, adopts every IP already in a
    /// Service's status, gives new Services the lowest free address of their pool, and
    /// writes status.loadBalancer.ingress, Events and pool status. Run two replicas: one
    /// is active through a Lease. SIGTERM releases the Lease and exits 0.
    Controller(controller_command::ControllerArgs),
    /// Why a LoadBalancer Service is pending or unreachable, and what to do about it.
    ///
    /// Walks the path an allocation and a packet take (class, controller, pool,
    /// L2Advertisement, eligible nodes, speakers, the announcing node, Pods, readiness,
    /// ports) and stops at the first broken link, with the evidence and the next thing to
    /// do. Reads the current cluster, or manifests with -f. Exits 0 only when the Service
    /// is healthy, so scripts can call it after `helm install`.
    Why(why::WhyArgs),
    /// Print the CustomResourceDefinitions as YAML (what the Helm chart installs).
    Crds,
    /// Failover shown in a network-namespace lab: three nodes, a client, the owner killed.
    ///
    /// As root. Builds the lab, runs the real speaker on every node, shows which node owns
    /// the VIP, kills it and prints how long the client's traffic was cut. Tears
    /// everything down on exit or Ctrl-C.
    Lab(ferrolb::lab_command::LabArgs),
    /// Announce this node's external IPs (ARP, NDP, NodePort forwarding).
    ///
    /// In a cluster, announces the IPs the controller wrote in Service status, elects
    /// each IP's node with the other speakers, and says on the Service which node
    /// announces it. With --manifests, runs with no cluster: pools, L2Advertisements,
    /// Services, Nodes and EndpointSlices come from YAML files in DIR, re-read when they
    /// change. Needs CAP_NET_RAW and CAP_NET_ADMIN. SIGTERM withdraws everything and
    /// exits 0.
    Speaker(SpeakerArgs),
}

#[derive(clap::Args)]
struct SpeakerArgs {
    /// Directory (or file) of manifests to run from, with no cluster. Without it the
    /// speaker runs in a cluster, found as kubectl finds it (--kubeconfig, $KUBECONFIG,
    /// ~/.kube/config, or the Pod's ServiceAccount).
    #[arg(long, value_name = "DIR")]
    manifests: Option<std::path::PathBuf>,
    /// Kubeconfig to use in a cluster.
    #[arg(long, value_name = "FILE", conflicts_with = "manifests")]
    kubeconfig: Option<PathBuf>,
    /// In a cluster: the spec.loadBalancerClass announced besides Services with no class
    /// (the controller's --load-balancer-class).
    #[arg(long, default_value = ferrolb_api::annotations::LOAD_BALANCER_CLASS)]
    load_balancer_class: String,
    /// Where /metrics, /healthz and /readyz are served (default in a cluster:
    /// 0.0.0.0:7473; with --manifests: not served unless given).
    #[arg(long, value_name = "ADDRESS")]
    metrics_address: Option<std::net::SocketAddr>,
    /// This node's name, as in its Node object.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    /// RFC 5227 probes before first announcing an IP on a link (0: do not probe).
    #[arg(long, default_value_t = 2)]
    probe_count: u32,
    /// Milliseconds between probes.
    #[arg(long, default_value_t = 30)]
    probe_interval_ms: u64,
    /// Milliseconds to wait for an answer after the last probe.
    #[arg(long, default_value_t = 100)]
    probe_wait_ms: u64,
    /// Gratuitous ARPs / unsolicited NAs sent when taking an IP (the first at once).
    #[arg(long, default_value_t = 5)]
    announce_count: u32,
    /// Milliseconds between those announcements.
    #[arg(long, default_value_t = 500)]
    announce_interval_ms: u64,
    /// Re-announce every owned IP this often (seconds), for fabrics that age out ARP
    /// entries. 0: never.
    #[arg(long, default_value_t = 0)]
    refresh_secs: u64,
    /// Milliseconds between checks of the manifest directory.
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// UDP port of speaker membership (on each node's InternalIP).
    #[arg(long, default_value_t = ferrolb_speaker::membership::DEFAULT_PORT)]
    memberlist_port: u16,
    /// File whose contents authenticate and encrypt membership traffic; every speaker
    /// must read the same bytes. Messages from speakers without it are dropped.
    #[arg(long, value_name = "FILE")]
    memberlist_secret_file: Option<std::path::PathBuf>,
    /// Run without membership: every declared node counts as alive (single node, tests).
    #[arg(long)]
    no_membership: bool,
    /// Membership probe period (ms). Shorter: faster failover, more packets and more
    /// false suspicions under load or loss.
    #[arg(long, default_value_t = 50)]
    member_probe_period_ms: u64,
    /// How long a probe waits for its answer (ms).
    #[arg(long, default_value_t = 20)]
    member_probe_rtt_ms: u64,
    /// How long a suspected speaker has to refute before it is declared down (ms).
    #[arg(long, default_value_t = 100)]
    member_suspect_ms: u64,
    /// A (re)started node takes IPs back from settled nodes only after this long (ms).
    #[arg(long, default_value_t = 3000)]
    rejoin_hold_ms: u64,
    /// At start, announce nothing until every declared peer is heard from, or this long (ms).
    #[arg(long, default_value_t = 1000)]
    join_grace_ms: u64,
}

fn main() -> ExitCode {
    fewer_malloc_arenas();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan {
            files,
            output,
            standalone,
        } => {
            let start = if standalone {
                ferrolb_allocator::Start::Hashed
            } else {
                ferrolb_allocator::Start::Lowest
            };
            plan::run(&files, output, start)
        }
        Command::Controller(args) => controller_command::run(args),
        Command::Why(args) => why::run(args),
        Command::Crds => print_crds(),
        Command::Speaker(args) => speaker(args),
        Command::Lab(args) => ferrolb::lab_command::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn speaker(args: SpeakerArgs) -> anyhow::Result<ExitCode> {
    use std::time::Duration;
    logging::init(args.log_format);
    let settings = ferrolb_speaker::responder::Settings {
        probe_count: args.probe_count,
        probe_interval: Duration::from_millis(args.probe_interval_ms),
        probe_wait: Duration::from_millis(args.probe_wait_ms),
        announce_count: args.announce_count.max(1),
        announce_interval: Duration::from_millis(args.announce_interval_ms),
        refresh: (args.refresh_secs > 0).then(|| Duration::from_secs(args.refresh_secs)),
        ..Default::default()
    };
    let secret = match &args.memberlist_secret_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("--memberlist-secret-file {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let cluster = (!args.no_membership).then(|| ferrolb_speaker::cluster::ClusterOptions {
        port: args.memberlist_port,
        secret,
        settings: ferrolb_speaker::membership::Settings {
            probe_period: Duration::from_millis(args.member_probe_period_ms),
            probe_rtt: Duration::from_millis(args.member_probe_rtt_ms),
            suspect_to_down: Duration::from_millis(args.member_suspect_ms),
            ..Default::default()
        },
        hold: Duration::from_millis(args.rejoin_hold_ms),
        join_grace: Duration::from_millis(args.join_grace_ms),
    });
    let metrics = std::sync::Arc::new(ferrolb_speaker::metrics::Metrics::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match args.manifests {
        Some(manifests) => {
            let options = ferrolb_speaker::standalone::Options {
                manifests,
                node_name: args.node_name,
                settings,
                poll_interval: Duration::from_millis(args.poll_interval_ms),
                cluster,
                metrics: metrics.clone(),
            };
            runtime.block_on(async {
                if let Some(address) = args.metrics_address {
                    let render = std::sync::Arc::new(move || metrics.encode());
                    ferrolb_kubernetes::http::serve(
                        address,
                        render,
                        std::sync::Arc::new(|| Ok(())),
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("--metrics-address {address}: {e}"))?;
                }
                ferrolb_speaker::standalone::run(options).await
            })?;
        }
        None => {
            let options = ferrolb_speaker::kubernetes::Options {
                daemon: ferrolb_speaker::daemon::Options {
                    node_name: args.node_name,
                    settings,
                    cluster,
                    addresses: ferrolb_speaker::announcements::Addresses::FromStatus {
                        class: args.load_balancer_class.clone(),
                    },
                    metrics,
                },
                metrics_address: args
                    .metrics_address
                    .unwrap_or_else(|| ([0, 0, 0, 0], 7473).into()),
            };
            runtime.block_on(async {
                let client = ferrolb_kubernetes::client::client(args.kubeconfig.as_deref()).await?;
                ferrolb_speaker::kubernetes::run(client, options).await
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// glibc's malloc gives each thread that allocates an arena of its own, up to eight per
/// core, and keeps what they freed: a long-running watcher whose every event is parsed on
/// some worker thread then holds several times the memory it uses. Two arenas serve a
/// process with two worker threads as fast.
fn fewer_malloc_arenas() {
    // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn print_crds() -> anyhow::Result<ExitCode> {
    print!("{}", crds_yaml()?);
    Ok(ExitCode::SUCCESS)
}

/// The CRDs as one multi-document YAML stream.
fn crds_yaml() -> anyhow::Result<String> {
    let mut out = String::new();
    for crd in ferrolb_api::crds::all() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The chart installs these files; they must be what the binary prints.
    #[test]
    fn chart_crds_match_the_generated_ones() {
        let generated = super::crds_yaml().unwrap();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/ferrolb/crds/crds.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == generated,
            "{path} is stale; regenerate it with `cargo run -- crds > charts/ferrolb/crds/crds.yaml`"
        );
    }

    /// The YAML means exactly the CRDs built from the Rust types (the CEL rules are
    /// folded over several lines; folding must not change them).
    #[test]
    fn crd_yaml_reads_back_as_the_same_crds() {
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let yaml = super::crds_yaml().unwrap();
        let read: Vec<CustomResourceDefinition> = serde_saphyr::from_multiple(&yaml).unwrap();
        assert_eq!(read, ferrolb_api::crds::all());
    }
}
