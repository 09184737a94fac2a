//! Network namespaces for the speaker's integration tests: unique names (tests run in
//! parallel, in several processes), removed by a guard even when a test panics.

#![allow(dead_code)] // each test file uses its own part

use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context as _, ensure};

/// `PREFIX-PID-N`, different for every call in every process.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A network namespace removed on drop, even when the test panics.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    /// `ip -n NS ARGS…`, failing with ip's stderr.
    pub fn ip(&self, args: &str) -> anyhow::Result<()> {
        let mut full = vec!["-n", &self.name];
        full.extend(args.split_whitespace());
        run("ip", &full)
    }

    /// Runs `body` on a thread that has entered this namespace, in a current-thread
    /// runtime there: netlink sockets belong to the namespace of the thread that opens
    /// them, and this runtime never moves tasks to other threads.
    pub fn run<F, Fut, T>(&self, body: F) -> anyhow::Result<T>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<T>>,
        T: Send + 'static,
    {
        let path = format!("/var/run/netns/{}", self.name);
        let thread = std::thread::spawn(move || -> anyhow::Result<T> {
            let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {path}"))?;
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(body())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {error:#}");
        }
    }
}

pub fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}
