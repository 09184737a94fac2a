//! Where a client's traffic starts: a lab [`Host`](super::Host), or any network namespace
//! (a real-node cluster's client, or this machine's own), so that outages are measured
//! the same way everywhere.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::sys;

/// Runs code whose sockets belong to some network.
pub trait Origin: Sync {
    /// A short name for messages.
    fn name(&self) -> &str;
    /// Runs `f` on a thread inside this network namespace.
    fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T>;
}

/// A network namespace by name (as in `ip netns list`), or this process's own.
#[derive(Debug, Clone)]
pub struct Netns {
    name: String,
    path: Option<PathBuf>,
}

impl Netns {
    /// The namespace `ip netns` knows as `name`.
    pub fn named(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            path: Some(PathBuf::from(sys::NETNS_DIR).join(name)),
        }
    }

    /// Its file (as `nsenter --net=` takes it), or `None` for this process's own.
    pub fn path(&self) -> Option<&std::path::Path> {
        self.path.as_deref()
    }

    /// The namespace this process runs in.
    pub fn current() -> Netns {
        Netns {
            name: "this machine".into(),
            path: None,
        }
    }
}

impl Origin for Netns {
    fn name(&self) -> &str {
        &self.name
    }

    fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        match &self.path {
            Some(path) => run_in(&self.name, path, f),
            None => Ok(f()),
        }
    }
}

/// Runs `f` on a thread that entered the namespace at `path`.
pub(crate) fn run_in<T: Send>(
    name: &str,
    path: &std::path::Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T> {
    let ns =
        std::fs::File::open(path).with_context(|| format!("{name}: opening {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering {}", path.display()))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("{name}: the thread in the namespace panicked"))?
    })
}
