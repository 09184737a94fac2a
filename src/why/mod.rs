//! `ferrolb why`: why a LoadBalancer Service is pending or unreachable, and what to do.
//! Gathers the facts from the cluster (or from files) and prints [`diagnose`]'s answer;
//! exits 0 only when the Service is healthy.

mod diagnose;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use ferrolb_allocator::ServiceKey;
use ferrolb_api::manifests::{Located, Manifests};
use ferrolb_api::{IPAddressPool, L2Advertisement, NodeAnnouncement};
use ferrolb_kubernetes::lease::Holder;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::ListParams;

pub use diagnose::{Components, Diagnosis, Facts, Speaker, diagnose};

#[derive(Clone, Copy, Debug, Default, clap::ValueEnum)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(clap::Args, Debug)]
pub struct WhyArgs {
    /// The Service: NAME or svc/NAME.
    service: String,
    /// Its namespace.
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// Read manifests (files or directories, as `ferrolb plan` does) instead of a cluster.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Text)]
    output: Format,
    /// Kubeconfig to use; without it, $KUBECONFIG or ~/.kube/config, as kubectl does.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The namespace ferrolb is installed in (its Lease and speaker Pods).
    #[arg(long, default_value = "ferrolb-system")]
    ferrolb_namespace: String,
    /// The controller's Lease (the chart names it RELEASE-ferrolb-controller, or
    /// ferrolb-controller for a release named ferrolb).
    #[arg(long, default_value = "ferrolb-controller")]
    lease_name: String,
    /// The loadBalancerClass ferrolb serves besides none.
    #[arg(long, default_value = ferrolb_api::annotations::LOAD_BALANCER_CLASS)]
    load_balancer_class: String,
}

pub fn run(args: WhyArgs) -> Result<ExitCode> {
    let name = args
        .service
        .strip_prefix("svc/")
        .or_else(|| args.service.strip_prefix("service/"))
        .unwrap_or(&args.service);
    let key = ServiceKey::new(args.namespace.clone(), name);
    let facts = if args.files.is_empty() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(from_cluster(&args, &key))?
    } else {
        from_files(&args)?
    };
    let d = diagnose(&facts, &key);
    match args.output {
        Format::Json => println!("{}", serde_json::to_string_pretty(&d)?),
        Format::Text => print!("{}", text(&d)),
    }
    Ok(if d.healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn text(d: &Diagnosis) -> String {
    let mut out = format!("{}\n", d.headline);
    for e in &d.evidence {
        out.push_str(&format!("  - {e}\n"));
    }
    if let Some(next) = &d.next {
        out.push_str(&format!("next: {next}\n"));
    }
    out
}

fn from_files(args: &WhyArgs) -> Result<Facts> {
    let input = crate::files::read(&args.files)?;
    for e in &input.errors {
        eprintln!("warning: {e}");
    }
    Ok(Facts {
        manifests: input.manifests,
        ferrolb_namespace: args.ferrolb_namespace.clone(),
        class: args.load_balancer_class.clone(),
        components: None,
    })
}

async fn from_cluster(args: &WhyArgs, key: &ServiceKey) -> Result<Facts> {
    let client = ferrolb_kubernetes::client::client(args.kubeconfig.as_deref()).await?;
    let all = ListParams::default();
    let mut services = Api::<Service>::all(client.clone())
        .list(&ListParams::default().fields("spec.type=LoadBalancer"))
        .await
        .context("listing LoadBalancer Services")?
        .items;
    if !services
        .iter()
        .any(|s| ferrolb_allocator::input::service_key(s) == *key)
        && let Some(svc) = Api::<Service>::namespaced(client.clone(), &key.namespace)
            .get_opt(&key.name)
            .await
            .with_context(|| format!("reading Service {key}"))?
    {
        services.push(svc);
    }
    let pools = Api::<IPAddressPool>::all(client.clone())
        .list(&all)
        .await
        .context("listing IPAddressPools (are ferrolb's CRDs installed? `ferrolb crds | kubectl apply -f -`)")?
        .items;
    let advertisements = Api::<L2Advertisement>::all(client.clone())
        .list(&all)
        .await
        .context("listing L2Advertisements")?
        .items;
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&all)
        .await?
        .items;
    let nodes = Api::<Node>::all(client.clone()).list(&all).await?.items;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), &key.namespace)
        .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={}", key.name)))
        .await?
        .items;
    let pods = Api::<Pod>::namespaced(client.clone(), &key.namespace)
        .list(&all)
        .await?
        .items;

    let leases: Api<Lease> = Api::namespaced(client.clone(), &args.ferrolb_namespace);
    let lease_name = args.lease_name.as_str();
    let controller = match leases.get_opt(lease_name).await? {
        None => Err(format!(
            "there is no Lease {}/{lease_name}: no controller has run there",
            args.ferrolb_namespace
        )),
        Some(lease) => {
            let spec = lease.spec.unwrap_or_default();
            // Read as the controller reads it to decide whether to go on acting.
            match Holder::of(&spec, Timestamp::now()) {
                None => Err(format!(
                    "no controller holds its Lease {}/{lease_name} (released, or never taken)",
                    args.ferrolb_namespace
                )),
                Some(h) if h.valid() => Ok(h.identity),
                Some(Holder {
                    identity,
                    renewed_ago: Some(ago),
                    ..
                }) => Err(format!(
                    "its Lease {}/{lease_name} was last renewed {:.0} s ago by {identity}",
                    args.ferrolb_namespace,
                    ago.as_secs_f64()
                )),
                Some(_) => Err(format!(
                    "its Lease {}/{lease_name} has never been held",
                    args.ferrolb_namespace
                )),
            }
        }
    };
    // A terminating Pod has stopped serving (a speaker withdraws on SIGTERM): during
    // `helm uninstall` the pools go first, and ferrolb is to be called not running, not
    // left holding IPs "in no pool".
    let ours: Vec<Pod> = Api::<Pod>::namespaced(client.clone(), &args.ferrolb_namespace)
        .list(&ListParams::default().labels("app.kubernetes.io/component in (speaker,controller)"))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect();
    let component = |p: &Pod, c: &str| {
        p.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app.kubernetes.io/component"))
            .is_some_and(|v| v == c)
    };
    // A Lease still in date with no ferrolb Pod left (uninstalled: the controller's RBAC
    // went before it could release the Lease) is no running controller.
    let controller = match controller {
        Ok(holder) if ours.is_empty() => Err(format!(
            "its Lease names {holder}, but no ferrolb Pod runs in namespace {}",
            args.ferrolb_namespace
        )),
        other => other,
    };
    let mut speakers: BTreeMap<String, Speaker> = ours
        .iter()
        .filter(|p| component(p, "speaker"))
        .filter_map(|p| Some((p.spec.as_ref()?.node_name.clone()?, speaker(p))))
        .collect();
    // What each node's record says of its kube-proxy and its kernel. Reading records is
    // a nicety: a user who may not list them still gets the rest of the diagnosis.
    let records = Api::<NodeAnnouncement>::namespaced(client.clone(), &args.ferrolb_namespace)
        .list(&all)
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    for record in records {
        if let Some(node) = record.metadata.name
            && let Some(s) = speakers.get_mut(&node)
        {
            s.kube_proxy_failing = record.spec.kube_proxy_failing;
            s.kernel_answers_arp = record.spec.kernel_answers_arp;
        }
    }

    Ok(Facts {
        manifests: Manifests {
            pools: Located::in_cluster(pools),
            l2_advertisements: Located::in_cluster(advertisements),
            services: Located::in_cluster(services),
            namespaces: Located::in_cluster(namespaces),
            nodes: Located::in_cluster(nodes),
            endpoint_slices: Located::in_cluster(slices),
            pods: Located::in_cluster(pods),
            warnings: Vec::new(),
        },
        class: args.load_balancer_class.clone(),
        ferrolb_namespace: args.ferrolb_namespace.clone(),
        components: Some(Components {
            controller,
            speakers,
        }),
    })
}

/// What a speaker Pod's status says: Ready, or why its container is not running.
fn speaker(p: &Pod) -> Speaker {
    let status = p.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let problem = status.container_statuses.iter().flatten().find_map(|c| {
        let waiting = c.state.as_ref()?.waiting.as_ref()?;
        let reason = waiting.reason.clone().unwrap_or_else(|| "waiting".into());
        let restarts = match c.restart_count {
            1 => "restarted once".to_string(),
            n => format!("restarted {n} times"),
        };
        let mut text = format!("in {reason} ({restarts}");
        if let Some(last) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
            text.push_str(&format!("; last exit code {}", last.exit_code));
            if let Some(why) = &last.reason {
                text.push_str(&format!(", {why}"));
            }
        }
        text.push(')');
        Some(text)
    });
    Speaker {
        pod: p.metadata.name.clone().unwrap_or_default(),
        ready,
        problem,
        kube_proxy_failing: None,
        kernel_answers_arp: None,
    }
}
