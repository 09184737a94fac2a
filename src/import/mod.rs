//! `ferrolb import metallb|cilium|kube-vip`: another load balancer's configuration,
//! from files or a live cluster, as ferrolb's IPAddressPools and L2Advertisements, with
//! what could not be carried over and whether any Service would change IP. Each
//! converter is pure (`metallb`, `cilium`, `kubevip`); `moves` is the check; reading the
//! cluster and writing the output happen here.

pub mod cilium;
pub mod conversion;
pub mod kubevip;
pub mod metallb;
pub mod moves;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use ferrolb_api::manifests::{Located, Manifests, Origin};
use ferrolb_api::{IPAddressPool, L2Advertisement};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Service};
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::{Discovery, Scope};
use kube::{Api, Client};

use conversion::{Conversion, Document};

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    #[command(subcommand)]
    source: Source,
}

#[derive(clap::Subcommand, Debug)]
enum Source {
    /// Convert MetalLB's configuration into ferrolb's, and check that no Service moves.
    ///
    /// Reads MetalLB's custom resources (IPAddressPool,
    /// L2Advertisement, and the deprecated AddressPool), the legacy ConfigMap `config` of
    /// MetalLB 0.12 and earlier (or that file alone, or the chart's values with
    /// `configInline`). Prints ferrolb's objects as YAML, lists on standard error what
    /// has no ferrolb equivalent (BGP, BFD, ...) and checks, with the allocator, that
    /// every Service would keep the IPs it holds. Exits 1 when something cannot be read,
    /// when a Service would change IP, or, with --strict, when anything is left behind.
    Metallb(MetallbArgs),
    /// Convert Cilium's LB-IPAM pools and L2 announcement policies into ferrolb's, and
    /// check that no Service moves.
    ///
    /// Reads CiliumLoadBalancerIPPools and CiliumL2AnnouncementPolicies (cilium.io
    /// v2alpha1 and v2) and lists Cilium's BGP objects as not carried over. Output, report
    /// and exit codes as for `import metallb`.
    Cilium(CommonArgs),
    /// Convert kube-vip's cloud provider configuration into ferrolb's, and check that no
    /// Service moves.
    ///
    /// Reads the ConfigMap kubevip (cidr-/range- per namespace and global) and writes a
    /// pool per namespace, the global pool and one L2Advertisement. Output, report and exit
    /// codes as for `import metallb`.
    KubeVip(KubeVipArgs),
}

#[derive(clap::Args, Debug)]
pub struct KubeVipArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The namespace of kube-vip's ConfigMap `kubevip`.
    #[arg(long, default_value = kubevip::NAMESPACE)]
    kubevip_namespace: String,
}

#[derive(clap::Args, Debug)]
pub struct MetallbArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// The namespace MetalLB runs in (where it reads its configuration).
    #[arg(long, default_value = "metallb-system")]
    metallb_namespace: String,
}

#[derive(clap::Args, Debug)]
pub struct CommonArgs {
    /// Read the configuration, and the Services and Namespaces to check, from these
    /// files or directories instead of the cluster.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// Write ipaddresspools.yaml and l2advertisements.yaml into this directory instead
    /// of printing them.
    #[arg(short = 'o', long = "output-dir", value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Fail when any part of the configuration is not carried over.
    #[arg(long)]
    strict: bool,
    /// `server`: have the API server check the result against ferrolb's CRDs (a dry-run
    /// server-side apply; nothing is stored).
    #[arg(long, value_enum, value_name = "MODE")]
    dry_run: Option<DryRun>,
    /// Kubeconfig to use; without it, $KUBECONFIG or ~/.kube/config, as kubectl does.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum DryRun {
    Server,
}

/// Where a configuration is read from in a cluster, and how it is converted.
struct From {
    /// `MetalLB`, `Cilium`: for messages.
    name: &'static str,
    /// Its API group, if it has custom resources.
    group: Option<&'static str>,
    /// The namespace of its objects; `None`: cluster-scoped ones only.
    namespace: Option<String>,
    /// A ConfigMap it reads (namespace, name).
    config_map: Option<(String, &'static str)>,
    /// The kinds read (`None`: every kind of the group).
    kinds: Option<&'static [&'static str]>,
    convert: fn(&[Document]) -> Conversion,
    /// What was looked for, when nothing was found.
    looked_for: &'static str,
}

pub fn run(args: ImportArgs) -> Result<ExitCode> {
    let (common, from) = match args.source {
        Source::Metallb(a) => (
            a.common,
            From {
                name: "MetalLB",
                group: Some("metallb.io"),
                config_map: Some((a.metallb_namespace.clone(), "config")),
                namespace: Some(a.metallb_namespace),
                kinds: None,
                convert: metallb::convert,
                looked_for: "no metallb.io object, no ConfigMap with data.config, no legacy \
                             config or chart values with configInline",
            },
        ),
        Source::Cilium(common) => (
            common,
            From {
                name: "Cilium",
                group: Some("cilium.io"),
                config_map: None,
                namespace: None,
                kinds: Some(&cilium::KINDS),
                convert: cilium::convert,
                looked_for: "no CiliumLoadBalancerIPPool, CiliumL2AnnouncementPolicy or \
                             Cilium BGP object",
            },
        ),
        Source::KubeVip(a) => (
            a.common,
            From {
                name: "kube-vip",
                group: None,
                config_map: Some((a.kubevip_namespace.clone(), kubevip::CONFIG_MAP)),
                namespace: Some(a.kubevip_namespace),
                kinds: None,
                convert: kubevip::convert,
                looked_for: "no ConfigMap kubevip",
            },
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(import(common, from))
}

async fn import(args: CommonArgs, from: From) -> Result<ExitCode> {
    let client = if args.files.is_empty() || args.dry_run.is_some() {
        Some(ferrolb_kubernetes::client::client(args.kubeconfig.as_deref()).await?)
    } else {
        None
    };
    let (docs, cluster) = if args.files.is_empty() {
        let client = client.clone().expect("a client without files");
        from_cluster(&client, &from).await?
    } else {
        from_files(&args.files)?
    };
    let conversion = (from.convert)(&docs);
    if conversion.read == 0 && conversion.errors.is_empty() {
        let source = match (&from.namespace, args.files.is_empty()) {
            (_, false) => "the files given".to_string(),
            (Some(ns), true) => format!("the cluster (namespace {ns})"),
            (None, true) => "the cluster".to_string(),
        };
        eprintln!(
            "error: no {} configuration in {source}: {}",
            from.name, from.looked_for
        );
        return Ok(ExitCode::from(1));
    }
    let check = moves::check(&cluster, &conversion);
    match &args.output_dir {
        Some(dir) => write_files(dir, &conversion)?,
        None => print!("{}", render(&conversion)?),
    }
    let mut failed = report(from.name, &conversion, &check, cluster.services.is_empty());
    if args.strict && !conversion.not_carried.is_empty() {
        eprintln!(
            "error: {} part(s) of {}'s configuration are not carried over (--strict)",
            conversion.not_carried.len(),
            from.name
        );
        failed = true;
    }
    if args.dry_run == Some(DryRun::Server) {
        let client = client.expect("a client with --dry-run");
        failed |= !server_dry_run(&client, &conversion).await?;
    }
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The documents of every file (Lists expanded), and the Services and Namespaces among
/// them.
fn from_files(paths: &[PathBuf]) -> Result<(Vec<Document>, Manifests)> {
    let input = crate::files::read(paths)?;
    // The other load balancer's objects are refused by ferrolb's reader; only the
    // Services and Namespaces it reads matter here.
    for e in input.errors.iter().filter(|e| {
        e.unparsable || e.object.starts_with(" (Service ") || e.object.starts_with(" (Namespace ")
    }) {
        eprintln!("warning: {e}");
    }
    let mut docs = Vec::new();
    for name in &input.read {
        let text = if name == "<stdin>" {
            anyhow::bail!("-f - cannot be used with import: give files or directories");
        } else {
            std::fs::read_to_string(name).with_context(|| format!("reading {name}"))?
        };
        let values = ferrolb_api::manifests::documents(name, &text).map_err(anyhow::Error::msg)?;
        for (i, value) in values.into_iter().enumerate() {
            let origin = format!("{name}, document {}", i + 1);
            if value.get("kind").and_then(|k| k.as_str()) == Some("List") {
                let items = value.get("items").and_then(|i| i.as_array()).cloned();
                for (j, item) in items.unwrap_or_default().into_iter().enumerate() {
                    docs.push(Document {
                        origin: format!("{origin}, items[{j}]"),
                        value: item,
                    });
                }
            } else {
                docs.push(Document { origin, value });
            }
        }
    }
    let cluster = Manifests {
        services: input.manifests.services,
        namespaces: input.manifests.namespaces,
        ..Default::default()
    };
    Ok((docs, cluster))
}

/// The configuration objects of `from` (whatever kinds of its group the API server
/// serves, or the ones it names), MetalLB's legacy ConfigMap, and every Service and
/// Namespace.
async fn from_cluster(client: &Client, from: &From) -> Result<(Vec<Document>, Manifests)> {
    let mut docs = Vec::new();
    if let Some(group) = from.group {
        docs.extend(custom_resources(client, from, group).await?);
    }
    if let Some((namespace, name)) = &from.config_map {
        let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
        if let Some(mut cm) = config_maps
            .get_opt(name)
            .await
            .with_context(|| format!("reading ConfigMap {namespace}/{name}"))?
        {
            cm.metadata.managed_fields = None;
            let mut value = serde_json::to_value(&cm)?;
            value["apiVersion"] = "v1".into();
            value["kind"] = "ConfigMap".into();
            docs.push(Document {
                origin: "cluster".into(),
                value,
            });
        }
    }
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default().fields("spec.type=LoadBalancer"))
        .await
        .context("listing LoadBalancer Services")?
        .items;
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing Namespaces")?
        .items;
    let cluster = Manifests {
        services: services
            .into_iter()
            .map(|s| Located::new(Origin::cluster(), s))
            .collect(),
        namespaces: namespaces
            .into_iter()
            .map(|n| Located::new(Origin::cluster(), n))
            .collect(),
        ..Default::default()
    };
    Ok((docs, cluster))
}

/// The objects of `from`'s API group, of the kinds it reads, in its namespace.
async fn custom_resources(client: &Client, from: &From, group: &str) -> Result<Vec<Document>> {
    let mut docs = Vec::new();
    let discovery = Discovery::new(client.clone())
        .filter(&[group])
        .run()
        .await
        .with_context(|| format!("discovering {}'s API ({group})", from.name))?;
    for group in discovery.groups() {
        // Every kind at its most stable version: MetalLB's preferred version (v1beta2)
        // holds only BGPPeer.
        for (resource, caps) in group.resources_by_stability() {
            if from
                .kinds
                .is_some_and(|kinds| !kinds.contains(&resource.kind.as_str()))
            {
                continue;
            }
            let api: Api<DynamicObject> = match (&caps.scope, &from.namespace) {
                (Scope::Namespaced, Some(ns)) => {
                    Api::namespaced_with(client.clone(), ns, &resource)
                }
                (Scope::Namespaced, None) => continue,
                (Scope::Cluster, _) => Api::all_with(client.clone(), &resource),
            };
            let list = api
                .list(&ListParams::default())
                .await
                .with_context(|| format!("listing {}", resource.plural))?;
            for mut object in list.items {
                object.types = Some(kube::api::TypeMeta {
                    api_version: resource.api_version.clone(),
                    kind: resource.kind.clone(),
                });
                object.metadata.managed_fields = None;
                docs.push(Document {
                    origin: "cluster".into(),
                    value: serde_json::to_value(&object)?,
                });
            }
        }
    }
    Ok(docs)
}

fn render(c: &Conversion) -> Result<String> {
    Ok(yaml_stream(&c.pools)? + &yaml_stream(&c.advertisements)?)
}

/// Objects as one multi-document YAML stream.
fn yaml_stream<T: serde::Serialize>(objects: &[T]) -> Result<String> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(object)?);
    }
    Ok(out)
}

fn write_files(dir: &Path, c: &Conversion) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (name, text) in [
        ("ipaddresspools.yaml", yaml_stream(&c.pools)?),
        ("l2advertisements.yaml", yaml_stream(&c.advertisements)?),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Prints what was converted, left behind and checked; true when it must fail.
fn report(name: &str, c: &Conversion, check: &moves::Check, no_services: bool) -> bool {
    eprintln!(
        "converted {} {name} object(s) into {} IPAddressPool(s) and {} L2Advertisement(s)",
        c.read,
        c.pools.len(),
        c.advertisements.len()
    );
    for e in &c.errors {
        eprintln!("error: {e}");
    }
    if !c.not_carried.is_empty() {
        eprintln!("not carried over:");
        for f in &c.not_carried {
            eprintln!("  - {}: {}", f.what, f.why);
        }
    }
    for n in &c.notes {
        eprintln!("note: {n}");
    }
    if no_services {
        eprintln!(
            "note: no LoadBalancer Service was read, so nothing checks that IPs stay: add \
             them (`kubectl get svc -A -o yaml > services.yaml`, then -f services.yaml)"
        );
    } else {
        eprintln!(
            "Services: {} keep their IPs, {} would change IP, {} would keep IPs nobody \
             announces, {} keep IPs their pools no longer offer them, {} have none yet",
            check.kept,
            check.moved.len(),
            check.unserved.len(),
            check.stranded.len(),
            check.pending_now
        );
        for (svc, why) in &check.moved {
            eprintln!("error: Service {svc} would change IP: {why}");
        }
        for (svc, why) in &check.unserved {
            eprintln!("error: Service {svc} would keep its IP but lose its traffic: {why}");
        }
        for (svc, why) in &check.stranded {
            eprintln!("warning: Service {svc} keeps its IPs, but {why}");
        }
    }
    !c.errors.is_empty() || !check.moved.is_empty() || !check.unserved.is_empty()
}

/// Each object through a server-side apply with dryRun=All; true when all are accepted.
async fn server_dry_run(client: &Client, c: &Conversion) -> Result<bool> {
    let params = PatchParams::apply("ferrolb-import").dry_run();
    let mut ok = true;
    let pools: Api<IPAddressPool> = Api::all(client.clone());
    for pool in &c.pools {
        let name = pool.metadata.name.clone().unwrap_or_default();
        if let Err(e) = pools.patch(&name, &params, &Patch::Apply(pool)).await {
            eprintln!(
                "error: the API server refuses IPAddressPool {name:?}: {}",
                refusal(&e)
            );
            ok = false;
        }
    }
    let ads: Api<L2Advertisement> = Api::all(client.clone());
    for ad in &c.advertisements {
        let name = ad.metadata.name.clone().unwrap_or_default();
        if let Err(e) = ads.patch(&name, &params, &Patch::Apply(ad)).await {
            eprintln!(
                "error: the API server refuses L2Advertisement {name:?}: {}",
                refusal(&e)
            );
            ok = false;
        }
    }
    if ok {
        eprintln!(
            "the API server accepts all {} object(s) (dry run: nothing was stored)",
            c.pools.len() + c.advertisements.len()
        );
    }
    Ok(ok)
}

fn refusal(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) if status.code == 404 => {
            "ferrolb's CRDs are not installed (`ferrolb crds | kubectl apply -f -`)".into()
        }
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}
