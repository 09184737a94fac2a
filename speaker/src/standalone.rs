//! The speaker with no cluster: objects come from a directory of YAML manifests, which
//! is re-read when it changes. Every node runs the same allocator and election on the
//! same files, so all agree on who announces what.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use ferrolb_api::manifests::Manifests;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::announcements::{NodePlan, plan_node};
use crate::cluster::{Cluster, ClusterOptions};
use crate::election::ClusterView;
use crate::forwarding::{ForwardRule, Forwarder};
use crate::interfaces::{self, Link};
use crate::responder::{LinkSpec, Responder, Settings};

pub struct Options {
    pub manifests: PathBuf,
    pub node_name: String,
    pub settings: Settings,
    /// How often the directory is checked for changes.
    pub poll_interval: Duration,
    /// Speaker membership; `None`: every declared node counts as alive.
    pub cluster: Option<ClusterOptions>,
}

/// Runs until SIGTERM or SIGINT, then withdraws everything it announced.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    // A typo in the path must not run a speaker that announces nothing; a directory
    // that exists but is empty for now is fine (files may come later).
    std::fs::metadata(&opts.manifests)
        .with_context(|| format!("--manifests {}", opts.manifests.display()))?;
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut links = interfaces::watch()
        .await
        .context("watching network interfaces (rtnetlink)")?;
    let forwarder = Forwarder::new();
    // A predecessor killed with rules in place leaves them behind: start from nothing.
    let mut forwarding_ok = match forwarder.reset() {
        Ok(()) => true,
        Err(e) => {
            warn!(error = %e, "nftables unavailable: NodePort forwarding is disabled until it works");
            false
        }
    };
    let mut dir = ManifestDir::new(opts.manifests.clone());
    let mut responder = Responder::new(opts.settings.clone());
    let mut state = Reported::default();
    info!(node = %opts.node_name, manifests = %opts.manifests.display(), "speaker started (standalone)");

    let mut manifests = dir.read();
    let mut cluster = join(&manifests, &opts, &links.borrow()).await;
    loop {
        let view = match (&mut cluster, &opts.cluster) {
            (Some(c), _) => c.view(),
            // Configured but not started: owning anything now could mean two owners.
            (None, Some(_)) => ClusterView {
                members: Some(BTreeMap::new()),
            },
            (None, None) => ClusterView::everyone(),
        };
        let plan = plan_node(&manifests, &opts.node_name, &view);
        let current_links = links.borrow_and_update().clone();
        let specs = link_specs(&plan, &opts.node_name, &current_links, &mut state);
        state.report(&plan);
        responder.update(specs);
        if plan.forwards != state.forwards || !forwarding_ok {
            match forwarder.apply(&plan.forwards) {
                Ok(_) => {
                    if plan.forwards != state.forwards {
                        info!(rules = plan.forwards.len(), "forwarding rules applied");
                    }
                    forwarding_ok = true;
                    state.forwards = plan.forwards.clone();
                }
                Err(e) if !plan.forwards.is_empty() || forwarding_ok => {
                    error!(error = %e, "cannot apply NodePort forwarding rules");
                    forwarding_ok = false;
                }
                Err(_) => {}
            }
        }
        // Wait for something to change.
        let wake = cluster.as_ref().and_then(Cluster::wake_at);
        loop {
            tokio::select! {
                _ = terminate.recv() => return withdraw(responder, &forwarder, &state, cluster).await,
                _ = interrupt.recv() => return withdraw(responder, &forwarder, &state, cluster).await,
                changed = links.changed() => {
                    changed.context("the interface watcher stopped")?;
                    if let Some(c) = &mut cluster {
                        c.set_subnets(interfaces::reachable_subnets(&links.borrow()));
                    }
                    break;
                }
                changed = async {
                    match &mut cluster {
                        Some(c) => c.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    changed?;
                    break;
                }
                _ = async {
                    match wake {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => break,
                _ = tokio::time::sleep(opts.poll_interval) => {
                    if dir.changed() {
                        manifests = dir.read();
                        match &mut cluster {
                            Some(c) => c.set_peers_from(&manifests),
                            None => cluster = join(&manifests, &opts, &links.borrow()).await,
                        }
                        break;
                    }
                }
            }
        }
    }
}

/// Starts membership when it is configured and this node's Node object says where to
/// bind; otherwise says why and runs without it (retried when the manifests change).
async fn join(manifests: &Manifests, opts: &Options, links: &[Link]) -> Option<Cluster> {
    let settings = opts.cluster.clone()?;
    let subnets = interfaces::reachable_subnets(links);
    match Cluster::join(manifests, &opts.node_name, subnets, settings).await {
        Ok(c) => Some(c),
        Err(e) => {
            error!("{e:#}; announcing nothing until membership can start");
            None
        }
    }
}

async fn withdraw(
    mut responder: Responder,
    forwarder: &Forwarder,
    state: &Reported,
    cluster: Option<Cluster>,
) -> anyhow::Result<()> {
    // Peers learn we are gone first, so the new owners announce while we withdraw.
    if let Some(mut c) = cluster {
        c.leave().await;
    }
    responder.shutdown().await;
    if let Err(e) = forwarder.remove() {
        error!(error = %e, "cannot remove the nftables table inet ferrolb");
    }
    info!(
        ips = state.owned.len(),
        "withdrew every announcement and forwarding rule; exiting"
    );
    Ok(())
}

/// What was last logged, so that each change is logged once.
#[derive(Default)]
struct Reported {
    problems: BTreeSet<String>,
    owned: BTreeMap<IpAddr, Vec<String>>,
    forwards: Vec<ForwardRule>,
    /// Who owned each IP at the last reconcile, to tell a takeover from a first start.
    owners: BTreeMap<IpAddr, Option<String>>,
}

impl Reported {
    fn report(&mut self, plan: &NodePlan) {
        let problems: BTreeSet<String> = plan.problems.iter().cloned().collect();
        for p in problems.difference(&self.problems) {
            warn!("{p}");
        }
        self.problems = problems;
    }

    fn problem(&mut self, text: String) {
        if self.problems.insert(text.clone()) {
            warn!("{text}");
        }
    }
}

/// Which link answers for which IP, from the plan and the links that exist now.
fn link_specs(plan: &NodePlan, node: &str, links: &[Link], state: &mut Reported) -> Vec<LinkSpec> {
    let mut specs: BTreeMap<u32, LinkSpec> = BTreeMap::new();
    let mut owned: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for a in &plan.announcements {
        let selection = interfaces::select(links, a.ip, &a.interfaces);
        for p in selection.problems {
            state.problem(format!(
                "{} (L2Advertisement {}): {p}",
                a.ip,
                a.advertisements.join(", ")
            ));
        }
        for index in selection.links {
            let Some(link) = links.iter().find(|l| l.index == index) else {
                continue;
            };
            let Some(mac) = link.mac else { continue };
            let spec = specs.entry(index).or_insert_with(|| LinkSpec {
                index,
                name: link.name.clone(),
                mac,
                ips: BTreeSet::new(),
                takeovers: BTreeSet::new(),
            });
            spec.ips.insert(a.ip);
            let before = state.owners.get(&a.ip).cloned().flatten();
            if before.is_some_and(|b| b != node) {
                spec.takeovers.insert(a.ip);
            }
            owned.entry(a.ip).or_default().push(link.name.clone());
        }
    }
    for (ip, names) in &owned {
        if state.owned.get(ip) != Some(names) {
            let services: Vec<String> = plan
                .announcements
                .iter()
                .filter(|a| a.ip == *ip)
                .flat_map(|a| a.services.iter().map(ToString::to_string))
                .collect();
            info!(ip = %ip, interfaces = %names.join(","), services = %services.join(","), "this node owns the IP");
        }
    }
    for ip in state.owned.keys().filter(|ip| !owned.contains_key(ip)) {
        let to = plan
            .owners
            .get(ip)
            .cloned()
            .flatten()
            .unwrap_or_else(|| "no node".into());
        info!(ip = %ip, new_owner = %to, "this node no longer owns the IP");
    }
    state.owned = owned;
    state.owners = plan.owners.clone();
    specs.into_values().collect()
}

/// A directory of manifests, remembered file by file so that a file that becomes
/// unreadable (half-written, a YAML typo) keeps its last good content: an edit in
/// progress never withdraws what was working.
struct ManifestDir {
    path: PathBuf,
    last_good: BTreeMap<PathBuf, String>,
    seen: BTreeMap<PathBuf, String>,
}

impl ManifestDir {
    fn new(path: PathBuf) -> ManifestDir {
        ManifestDir {
            path,
            last_good: BTreeMap::new(),
            seen: BTreeMap::new(),
        }
    }

    fn scan(&self) -> BTreeMap<PathBuf, String> {
        let mut files = BTreeMap::new();
        collect(&self.path, &mut files);
        files
    }

    fn changed(&self) -> bool {
        self.scan() != self.seen
    }

    fn read(&mut self) -> Manifests {
        let files = self.scan();
        if files.is_empty() {
            warn!(dir = %self.path.display(), "no manifests found (.yaml, .yml or .json files)");
        }
        let mut manifests = Manifests::default();
        self.last_good.retain(|path, _| files.contains_key(path));
        for (path, text) in &files {
            let name = path.display().to_string();
            let mut trial = Manifests::default();
            let errors = trial.add_text(&name, text);
            let unparsable = errors.iter().any(|e| e.unparsable);
            for e in &errors {
                error!("{e}");
            }
            if unparsable && let Some(old) = self.last_good.get(path) {
                warn!(file = %name, "keeping this file's last readable content");
                manifests.add_text(&name, old);
                continue;
            }
            if !unparsable {
                self.last_good.insert(path.clone(), text.clone());
            }
            manifests.add_text(&name, text);
        }
        for w in &manifests.warnings {
            warn!("{w}");
        }
        self.seen = files;
        manifests
    }
}

fn collect(path: &Path, into: &mut BTreeMap<PathBuf, String>) {
    let Ok(entries) = std::fs::read_dir(path) else {
        if std::fs::metadata(path).is_ok_and(|m| m.is_file())
            && let Ok(text) = std::fs::read_to_string(path)
        {
            into.insert(path.to_path_buf(), text);
        }
        return;
    };
    for entry in entries.flatten() {
        let p = entry.path();
        if p.is_dir() {
            collect(&p, into);
        } else if matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            match std::fs::read_to_string(&p) {
                Ok(text) => {
                    into.insert(p, text);
                }
                Err(e) => error!(file = %p.display(), error = %e, "cannot read manifest"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manifest_path_that_does_not_exist_stops_the_speaker_at_once() {
        let opts = Options {
            manifests: PathBuf::from("/does-not-exist/ferrolb"),
            node_name: "a".into(),
            settings: Settings::default(),
            poll_interval: Duration::from_millis(200),
            cluster: None,
        };
        let result = tokio::time::timeout(Duration::from_secs(30), run(opts))
            .await
            .expect("the speaker should stop at once, not run on");
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.starts_with("--manifests /does-not-exist/ferrolb: No such file or directory"),
            "{err}"
        );
    }

    #[test]
    fn a_file_with_a_syntax_error_keeps_its_last_readable_content() {
        let dir = std::env::temp_dir().join(format!("ferrolb-standalone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("svc.yaml");
        let good = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: b}\n";
        std::fs::write(&file, good).unwrap();
        let mut manifests = ManifestDir::new(dir.clone());
        assert_eq!(manifests.read().services.len(), 2);
        // Half-way through an edit: the second document is broken.
        std::fs::write(&file, good.replace("{name: b}", "[name: b")).unwrap();
        let names: Vec<_> = manifests
            .read()
            .services
            .iter()
            .map(|s| s.object.metadata.name.clone().unwrap())
            .collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(names, ["a", "b"]);
    }
}
