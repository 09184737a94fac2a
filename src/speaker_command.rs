//! `ferrolb speaker`: announces this node's external IPs, in a cluster or from manifests.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::logging;
use tracing::Instrument;

#[derive(clap::Args)]
pub struct SpeakerArgs {
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
    /// 0.0.0.0:7474; with --manifests: not served unless given). The chart binds the
    /// node's own IP; an IPv6 address may go without brackets ($(NODE_IP):7474).
    #[arg(long, value_name = "ADDRESS", value_parser = ferrolb_kubernetes::http::parse_address)]
    metrics_address: Option<std::net::SocketAddr>,
    /// In a cluster: ferrolb's namespace, where this node's NodeAnnouncement is written;
    /// default: $POD_NAMESPACE, else the Pod's own namespace, else "default".
    #[arg(long, env = "POD_NAMESPACE")]
    namespace: Option<String>,
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
    /// Answer ARP for announced IPs in the kernel, with a tc program on each link
    /// (Linux 6.6 or later; needs CAP_BPF and CAP_NET_ADMIN). Where it cannot be
    /// attached the speaker answers in user space, and says so in its log and in
    /// ferrolb_speaker_arp_in_kernel.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    arp_in_kernel: bool,
    /// Milliseconds between checks of the manifest directory.
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// UDP port of speaker membership (on each node's InternalIP).
    #[arg(long, default_value_t = ferrolb_speaker::membership::DEFAULT_PORT)]
    memberlist_port: u16,
    /// Keyring that authenticates and encrypts membership traffic: one key per line
    /// (at least 8 bytes each, at most 8 keys); the first seals what this speaker sends,
    /// every one opens what it receives, so a key can be rotated without splitting the
    /// cluster (docs/security.md). Read again every 5 s: a rotation needs no restart.
    /// Without it membership is unencrypted and anyone on the network can forge it.
    #[arg(long, value_name = "FILE")]
    memberlist_secret_file: Option<std::path::PathBuf>,
    /// Forward VIP traffic to NodePorts where an L2Advertisement asks for it
    /// (spec.forwarding: nodePort). Needs CAP_NET_ADMIN (nftables); with false the
    /// speaker needs only CAP_NET_RAW and never touches nftables.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    node_port_forwarding: bool,
    /// Run without membership: every declared node counts as alive (single node, tests).
    #[arg(long)]
    no_membership: bool,
    /// Membership probe period (ms). Shorter: faster failover, more packets and more
    /// false suspicions under load or loss.
    #[arg(long, default_value_t = 40)]
    member_probe_period_ms: u64,
    /// How long a probe waits for its answer (ms).
    #[arg(long, default_value_t = 15)]
    member_probe_rtt_ms: u64,
    /// How long a suspected speaker has to refute before it is declared down (ms).
    #[arg(long, default_value_t = 80)]
    member_suspect_ms: u64,
    /// A (re)started node takes IPs back from settled nodes only after this long (ms).
    #[arg(long, default_value_t = 3000)]
    rejoin_hold_ms: u64,
    /// At start, announce nothing until every declared peer is heard from, or this long (ms).
    #[arg(long, default_value_t = 1000)]
    join_grace_ms: u64,
    /// Port of kube-proxy's health server (`healthzBindAddress`, usually 10256), checked
    /// on this node's InternalIP: while it fails, other nodes announce this node's IPs.
    /// 0: do not check (the chart checks 10256). Needs membership.
    #[arg(long, default_value_t = 0)]
    kube_proxy_health_port: u16,
    /// Milliseconds between those checks (2 failures in a row: unhealthy; 4 passes:
    /// healthy again).
    #[arg(long, default_value_t = 500)]
    kube_proxy_health_interval_ms: u64,
}

pub fn run(args: SpeakerArgs) -> anyhow::Result<ExitCode> {
    use std::time::Duration;
    logging::init(args.log_format);
    let settings = ferrolb_speaker::responder::Settings {
        probe_count: args.probe_count,
        probe_interval: Duration::from_millis(args.probe_interval_ms),
        probe_wait: Duration::from_millis(args.probe_wait_ms),
        announce_count: args.announce_count.max(1),
        announce_interval: Duration::from_millis(args.announce_interval_ms),
        refresh: (args.refresh_secs > 0).then(|| Duration::from_secs(args.refresh_secs)),
        arp_in_kernel: args.arp_in_kernel,
        ..Default::default()
    };
    let keyring = match &args.memberlist_secret_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(anyhow::Error::from)
                .and_then(|contents| ferrolb_speaker::membership::Keyring::parse(&contents))
                .map_err(|e| {
                    anyhow::anyhow!("--memberlist-secret-file {}: {e:#}", path.display())
                })?,
        ),
        None => None,
    };
    if args.no_membership && args.kube_proxy_health_port != 0 {
        anyhow::bail!(
            "--kube-proxy-health-port {} needs membership, which tells the other nodes that this \
             one cannot deliver: drop --no-membership, or set --kube-proxy-health-port 0",
            args.kube_proxy_health_port
        );
    }
    let cluster = (!args.no_membership).then(|| ferrolb_speaker::cluster::ClusterOptions {
        port: args.memberlist_port,
        keyring,
        keyring_file: args.memberlist_secret_file.clone(),
        settings: ferrolb_speaker::membership::Settings {
            probe_period: Duration::from_millis(args.member_probe_period_ms),
            probe_rtt: Duration::from_millis(args.member_probe_rtt_ms),
            suspect_to_down: Duration::from_millis(args.member_suspect_ms),
            ..Default::default()
        },
        hold: Duration::from_millis(args.rejoin_hold_ms),
        join_grace: Duration::from_millis(args.join_grace_ms),
        kube_proxy_health: (args.kube_proxy_health_port != 0).then(|| {
            ferrolb_speaker::proxy_health::Check {
                port: args.kube_proxy_health_port,
                interval: Duration::from_millis(args.kube_proxy_health_interval_ms.max(50)),
            }
        }),
    });
    let metrics = std::sync::Arc::new(ferrolb_speaker::metrics::Metrics::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Every line names the node, so that logs gathered from all nodes can be followed.
    let span = tracing::info_span!("speaker", node = %args.node_name);
    match args.manifests {
        Some(manifests) => {
            let options = ferrolb_speaker::standalone::Options {
                manifests,
                node_name: args.node_name,
                settings,
                poll_interval: Duration::from_millis(args.poll_interval_ms),
                cluster,
                metrics: metrics.clone(),
                node_port_forwarding: args.node_port_forwarding,
            };
            runtime.block_on(
                async {
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
                }
                .instrument(span),
            )?;
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
                    node_port_forwarding: args.node_port_forwarding,
                },
                metrics_address: args
                    .metrics_address
                    .unwrap_or_else(|| ([0, 0, 0, 0], 7474).into()),
                namespace: crate::namespace::own(args.namespace),
            };
            runtime.block_on(
                async {
                    let client =
                        ferrolb_kubernetes::client::client(args.kubeconfig.as_deref()).await?;
                    ferrolb_speaker::kubernetes::run(client, options).await
                }
                .instrument(span),
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
