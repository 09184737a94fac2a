//! `ferrolb drain NODE`: move a node's external IPs to other nodes before maintenance,
//! and `--undo` to let it announce again.
//!
//! It labels the Node `ferrolb.io/drain` ([`DRAIN_LABEL`]), which every speaker's
//! election honours as it does the exclude label: each IP the node announces goes to its
//! runner-up, which sends gratuitous ARPs / unsolicited NAs at once. Nothing is lost for
//! new flows: until a client hears the announcement its packets still reach the drained
//! node, whose kube-proxy carries them as before. The command then waits until the
//! nodes' records show every IP announced elsewhere, and says where each went.
//!
//! It refuses (unless `--force`) when some IP would be left with no node to announce it:
//! an `externalTrafficPolicy: Local` Service whose only ready endpoint is on the node, or
//! an L2Advertisement whose nodeSelectors match that node alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrolb_allocator::ServiceKey;
use ferrolb_api::NodeAnnouncement;
use ferrolb_api::manifests::{Located, Manifests};
use ferrolb_speaker::announcements::{Addresses, DRAIN_LABEL, plan};
use ferrolb_speaker::election::ClusterView;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The node, as named by its Node object.
    node: String,
    /// Let the node announce again (removes the label); waits until it has taken back
    /// the IPs the election gives it.
    #[arg(long)]
    undo: bool,
    /// Drain even when some IP would be left with no node to announce it.
    #[arg(long)]
    force: bool,
    /// How long to wait for the IPs to move (seconds).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Kubeconfig to use; without it, $KUBECONFIG or ~/.kube/config, as kubectl does.
    #[arg(long, value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// The namespace ferrolb is installed in (the nodes' NodeAnnouncements).
    #[arg(long, default_value = "ferrolb-system")]
    ferrolb_namespace: String,
    /// The loadBalancerClass ferrolb serves besides none.
    #[arg(long, default_value = ferrolb_api::annotations::LOAD_BALANCER_CLASS)]
    load_balancer_class: String,
}

pub fn run(args: DrainArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(drain(&args))
}

/// `m` with `node` labelled drained (`on`) or not.
fn labelled(m: &Manifests, node: &str, on: bool) -> Manifests {
    let mut m = m.clone();
    for n in &mut m.nodes {
        if n.object.metadata.name.as_deref() == Some(node) {
            let mut object = (*n.object).clone();
            let labels = object.metadata.labels.get_or_insert_default();
            if on {
                labels.insert(DRAIN_LABEL.into(), "true".into());
            } else {
                labels.remove(DRAIN_LABEL);
            }
            n.object = std::sync::Arc::new(object);
        }
    }
    m
}

/// Who announces each IP with every speaker up (`None`: no node may).
fn owners(m: &Manifests, class: &str) -> BTreeMap<IpAddr, Option<String>> {
    // The plan of any node gives every IP's owner; the node asked about is irrelevant.
    let node = m
        .nodes
        .first()
        .and_then(|n| n.object.metadata.name.clone())
        .unwrap_or_default();
    let addresses = Addresses::FromStatus {
        class: class.to_string(),
    };
    plan(m, &node, &ClusterView::everyone(), &addresses).owners
}

/// The IPs that draining `node` would leave with no node to announce them, with their
/// Services. Pure.
pub fn left_without_node(
    m: &Manifests,
    node: &str,
    class: &str,
) -> BTreeMap<IpAddr, Vec<ServiceKey>> {
    let before = owners(&labelled(m, node, false), class);
    let after = owners(&labelled(m, node, true), class);
    let services = services_by_ip(m);
    after
        .into_iter()
        .filter(|(ip, owner)| {
            owner.is_none() && before.get(ip).is_some_and(|b| b.as_deref() == Some(node))
        })
        .map(|(ip, _)| (ip, services.get(&ip).cloned().unwrap_or_default()))
        .collect()
}

/// Of `owners` (see [`owners`]), the IPs the election gives `node`.
pub fn owned_by(owners: &BTreeMap<IpAddr, Option<String>>, node: &str) -> BTreeSet<IpAddr> {
    owners
        .iter()
        .filter(|(_, owner)| owner.as_deref() == Some(node))
        .map(|(ip, _)| *ip)
        .collect()
}

fn services_by_ip(m: &Manifests) -> BTreeMap<IpAddr, Vec<ServiceKey>> {
    let mut by_ip: BTreeMap<IpAddr, Vec<ServiceKey>> = BTreeMap::new();
    for s in &m.services {
        for ip in ferrolb_allocator::input::ingress_ips(&s.object) {
            by_ip
                .entry(ip)
                .or_default()
                .push(ferrolb_allocator::input::service_key(&s.object));
        }
    }
    by_ip
}

async fn read(client: &kube::Client) -> Result<Manifests> {
    let all = ListParams::default();
    let load_balancers = ListParams::default().fields("spec.type=LoadBalancer");
    Ok(Manifests {
        pools: list(
            client,
            &all,
            "IPAddressPools (are ferrolb's CRDs installed?)",
        )
        .await?,
        l2_advertisements: list(client, &all, "L2Advertisements").await?,
        services: list(client, &load_balancers, "LoadBalancer Services").await?,
        namespaces: list(client, &all, "Namespaces").await?,
        nodes: list(client, &all, "Nodes").await?,
        endpoint_slices: list(client, &all, "EndpointSlices").await?,
        pods: Vec::new(),
        warnings: Vec::new(),
    })
}

/// Every `K` in the cluster, as read from it.
async fn list<K>(client: &kube::Client, params: &ListParams, what: &str) -> Result<Vec<Located<K>>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let items = Api::<K>::all(client.clone())
        .list(params)
        .await
        .with_context(|| format!("listing {what}"))?
        .items;
    Ok(Located::in_cluster(items))
}

/// Which node each IP is announced by now, from the nodes' records (a held-back IP or
/// one given up is announced by nobody).
async fn announced(records: &Api<NodeAnnouncement>) -> Result<BTreeMap<IpAddr, BTreeSet<String>>> {
    let mut by_ip: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for r in records.list(&ListParams::default()).await?.items {
        let Some(node) = r.metadata.name else {
            continue;
        };
        for entry in r.spec.ips {
            let held = entry.other_responder.as_ref().is_some_and(|o| o.held_back);
            if entry.interfaces.is_empty() || held {
                continue;
            }
            if let Ok(ip) = entry.ip.parse() {
                by_ip.entry(ip).or_default().insert(node.clone());
            }
        }
    }
    Ok(by_ip)
}

fn listed(ips: &BTreeMap<IpAddr, Vec<ServiceKey>>) -> String {
    ips.iter()
        .map(|(ip, services)| {
            let names: Vec<String> = services.iter().map(ToString::to_string).collect();
            format!("{ip} ({})", names.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

async fn drain(args: &DrainArgs) -> Result<ExitCode> {
    let client = ferrolb_kubernetes::client::client(args.kubeconfig.as_deref()).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = &args.node;
    if nodes.get_opt(node).await?.is_none() {
        bail!("node {node:?} not found (kubectl get nodes lists them)");
    }
    let m = read(&client).await?;
    let class = &args.load_balancer_class;
    let records: Api<NodeAnnouncement> = Api::namespaced(client.clone(), &args.ferrolb_namespace);
    let before = announced(&records).await?;
    let deadline = Duration::from_secs(args.timeout);
    let label = |value: serde_json::Value| {
        Patch::Merge(serde_json::json!({"metadata": {"labels": {DRAIN_LABEL: value}}}))
    };
    let params = PatchParams::default();
    if args.undo {
        // With every speaker up and the node not drained.
        let all = owners(&labelled(&m, node, false), class);
        let returning = owned_by(&all, node);
        nodes
            .patch(node, &params, &label(serde_json::Value::Null))
            .await
            .with_context(|| format!("removing the label {DRAIN_LABEL} from node {node}"))?;
        println!(
            "node {node} may announce again: the election gives it {} of the {} IPs in the cluster",
            returning.len(),
            all.len()
        );
        let started = Instant::now();
        let waiting = wait(&records, deadline, |now| {
            returning
                .iter()
                .filter(|ip| !now.get(ip).is_some_and(|n| n.contains(node)))
                .copied()
                .collect()
        })
        .await?;
        return report(
            started,
            &waiting,
            |ip| format!("{ip}: {} → {node}", nodes_of(&before, ip)),
            &returning,
        );
    }
    let orphaned = left_without_node(&m, node, class);
    if !orphaned.is_empty() && !args.force {
        bail!(
            "draining node {node} would leave {} with no node to announce {}: {}. Give each another \
             eligible node (a ready endpoint elsewhere for externalTrafficPolicy: Local, the \
             L2Advertisement's nodeSelectors), or drain with --force",
            ips(orphaned.len()),
            if orphaned.len() == 1 { "it" } else { "them" },
            listed(&orphaned)
        );
    }
    let moving: BTreeSet<IpAddr> = before
        .iter()
        .filter(|(ip, n)| n.contains(node) && !orphaned.contains_key(ip))
        .map(|(ip, _)| *ip)
        .collect();
    nodes
        .patch(node, &params, &label(serde_json::Value::from("true")))
        .await
        .with_context(|| format!("labelling node {node} {DRAIN_LABEL}=true"))?;
    println!(
        "node {node} labelled {DRAIN_LABEL}=true: moving {} it announces",
        ips(moving.len())
    );
    if !orphaned.is_empty() {
        println!("left with no node (--force): {}", listed(&orphaned));
    }
    let started = Instant::now();
    let mut now_by = BTreeMap::new();
    let waiting = wait(&records, deadline, |now| {
        now_by = now.clone();
        moving
            .iter()
            .filter(|ip| now.get(ip).is_none_or(|n| n.contains(node) || n.is_empty()))
            .copied()
            .collect()
    })
    .await?;
    report(
        started,
        &waiting,
        |ip| format!("{ip}: {node} → {}", nodes_of(&now_by, ip)),
        &moving,
    )
}

fn ips(n: usize) -> String {
    if n == 1 {
        "1 IP".into()
    } else {
        format!("{n} IPs")
    }
}

fn nodes_of(by_ip: &BTreeMap<IpAddr, BTreeSet<String>>, ip: &IpAddr) -> String {
    match by_ip.get(ip) {
        Some(n) if !n.is_empty() => n.iter().cloned().collect::<Vec<_>>().join(", "),
        _ => "no node".into(),
    }
}

/// Polls the records every 100 ms until `waiting` (given who announces what) is empty,
/// or `deadline` passes: what is still waiting then.
async fn wait(
    records: &Api<NodeAnnouncement>,
    deadline: Duration,
    mut waiting: impl FnMut(&BTreeMap<IpAddr, BTreeSet<String>>) -> BTreeSet<IpAddr>,
) -> Result<BTreeSet<IpAddr>> {
    let started = Instant::now();
    loop {
        let left = waiting(&announced(records).await?);
        if left.is_empty() || started.elapsed() > deadline {
            return Ok(left);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn report(
    started: Instant,
    waiting: &BTreeSet<IpAddr>,
    line: impl Fn(&IpAddr) -> String,
    all: &BTreeSet<IpAddr>,
) -> Result<ExitCode> {
    for ip in all.iter().filter(|ip| !waiting.contains(ip)) {
        println!("  {}", line(ip));
    }
    if waiting.is_empty() {
        println!(
            "done: {} moved in {} ms",
            ips(all.len()),
            started.elapsed().as_millis()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let left: Vec<String> = waiting.iter().map(ToString::to_string).collect();
    eprintln!(
        "error: after {} s, {} of {} IPs have not moved: {} (the speakers' logs say why; \
         `ferrolb why` on their Services)",
        started.elapsed().as_secs(),
        waiting.len(),
        all.len(),
        left.join(", ")
    );
    Ok(ExitCode::from(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 192.0.2.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 192.0.2.2}]}
---
apiVersion: ferrolb.io/v1beta1
kind: IPAddressPool
metadata: {name: lab}
spec: {addresses: [192.0.2.200-192.0.2.209]}
---
apiVersion: ferrolb.io/v1beta1
kind: L2Advertisement
metadata: {name: lab}
spec: {}
";

    fn service(name: &str, ip: &str, local: bool) -> String {
        let policy = if local { "Local" } else { "Cluster" };
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec: {{type: LoadBalancer, externalTrafficPolicy: {policy}, ports: [{{port: 80}}]}}\n\
             status: {{loadBalancer: {{ingress: [{{ip: {ip}}}]}}}}\n"
        )
    }

    fn slice(service: &str, node: &str) -> String {
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {service}-1, namespace: shop, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: IPv4\nendpoints: [{{addresses: [10.0.0.1], nodeName: {node}, conditions: {{ready: true}}}}]\n"
        )
    }

    fn manifests(text: &str) -> Manifests {
        let mut m = Manifests::default();
        assert_eq!(m.add_text("t.yaml", text), vec![]);
        m
    }

    /// A Local Service whose only endpoint is on the drained node would be left with
    /// nobody: named, with its Service; a Cluster one moves.
    #[test]
    fn draining_names_what_would_be_left_without_a_node() {
        let text = format!(
            "{NODES}{}{}{}",
            service("web", "192.0.2.200", false),
            service("db", "192.0.2.201", true),
            slice("db", "node-a"),
        );
        let m = manifests(&text);
        let class = ferrolb_api::annotations::LOAD_BALANCER_CLASS;
        let left = left_without_node(&m, "node-a", class);
        assert_eq!(
            listed(&left),
            "192.0.2.201 (shop/db)",
            "only the Local Service's IP, whose endpoint is on node-a"
        );
        assert!(left_without_node(&m, "node-b", class).is_empty());
        // Once drained, node-a is given nothing back until undone.
        let drained = labelled(&m, "node-a", true);
        assert!(
            owners(&drained, class)
                .values()
                .all(|o| o.as_deref() != Some("node-a"))
        );
        let back = owned_by(
            &owners(&labelled(&drained, "node-a", false), class),
            "node-a",
        );
        assert!(back.contains(&"192.0.2.201".parse().unwrap()), "{back:?}");
    }
}
