//! The speaker with no cluster: objects come from a directory of YAML manifests, which
//! is re-read when it changes. Every node runs the same allocator and election on the
//! same files, so all agree on who announces what.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ferrolb_api::manifests::Manifests;
use tracing::{error, info, warn};

use crate::announcements::Addresses;
use crate::cluster::ClusterOptions;
use crate::daemon::{self, Objects};
use crate::metrics::Metrics;
use crate::responder::Settings;

pub struct Options {
    pub manifests: PathBuf,
    pub node_name: String,
    pub settings: Settings,
    /// How often the directory is checked for changes.
    pub poll_interval: Duration,
    /// Speaker membership; `None`: every declared node counts as alive.
    pub cluster: Option<ClusterOptions>,
    pub metrics: Arc<Metrics>,
    /// See [`daemon::Options::node_port_forwarding`].
    pub node_port_forwarding: bool,
}

/// Runs until SIGTERM or SIGINT, then withdraws everything it announced.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    // A typo in the path must not run a speaker that announces nothing; a directory
    // that exists but is empty for now is fine (files may come later).
    std::fs::metadata(&opts.manifests)
        .with_context(|| format!("--manifests {}", opts.manifests.display()))?;
    info!(node = %opts.node_name, manifests = %opts.manifests.display(), "speaker started (standalone)");
    let mut dir = ManifestDir::new(opts.manifests.clone());
    let current = Arc::new(dir.read());
    let objects = DirObjects {
        dir,
        current,
        poll_interval: opts.poll_interval,
    };
    let daemon = daemon::Options {
        node_name: opts.node_name,
        settings: opts.settings,
        cluster: opts.cluster,
        addresses: Addresses::Allocated,
        metrics: opts.metrics,
        node_port_forwarding: opts.node_port_forwarding,
    };
    daemon::run(objects, daemon).await
}

/// A manifest directory as the speaker's [`Objects`], checked every `poll_interval`.
struct DirObjects {
    dir: ManifestDir,
    current: Arc<Manifests>,
    poll_interval: Duration,
}

impl Objects for DirObjects {
    fn current(&mut self) -> Arc<Manifests> {
        self.current.clone()
    }

    async fn changed(&mut self) -> anyhow::Result<()> {
        loop {
            tokio::time::sleep(self.poll_interval).await;
            if self.dir.changed() {
                self.current = Arc::new(self.dir.read());
                return Ok(());
            }
        }
    }
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
            metrics: Arc::default(),
            node_port_forwarding: true,
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
