//! A long-running program inside a lab host, killed when its handle is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::sys;

/// A process started with [`Host::spawn`](super::Host::spawn).
///
/// It leads its own process group, so signals reach anything it forks too. Its stdout and
/// stderr go to files in the lab's log directory, readable while it runs (tests poll them
/// for log lines). Dropping the handle SIGKILLs the group and reaps the process, so a test
/// that fails half-way leaves nothing running.
#[derive(Debug)]
pub struct LabProcess {
    child: Child,
    label: String,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    status: Option<ExitStatus>,
}

impl LabProcess {
    pub(crate) fn start(
        label: String,
        mut cmd: Command,
        stdout_path: PathBuf,
        stderr_path: PathBuf,
    ) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        let line = sys::display(&cmd);
        let create = |path: &Path| {
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
        };
        cmd.stdin(std::process::Stdio::null())
            .stdout(create(&stdout_path)?)
            .stderr(create(&stderr_path)?)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("{label}: cannot start `{line}`"))?;
        Ok(Self {
            child,
            label: format!("{label}: `{line}`"),
            stdout_path,
            stderr_path,
            status: None,
        })
    }

    /// The process id (also its process group id). `ip netns exec` execs the program
    /// in place, so this is the program itself.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM to the process group: the graceful shutdown a service manager does.
    pub fn terminate(&self) -> Result<()> {
        self.signal_group("TERM")
    }

    /// Sends SIGKILL to the process group: a crash, with no chance to clean up.
    pub fn kill_hard(&self) -> Result<()> {
        self.signal_group("KILL")
    }

    fn signal_group(&self, signal: &str) -> Result<()> {
        if self.status.is_some() {
            // Reaped: its pid (and so its group id) may belong to someone else by now.
            return Ok(());
        }
        sys::signal(signal, &[-i64::from(self.pid())])
            .with_context(|| format!("signalling {}", self.label))
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.label))?;
        }
        Ok(self.status)
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if start.elapsed() >= timeout {
                return Ok(None);
            }
            std::thread::sleep(super::POLL_INTERVAL);
        }
    }

    /// Everything the process has written to stdout so far.
    pub fn stdout(&self) -> Result<String> {
        read_lossy(&self.stdout_path)
    }

    /// Everything the process has written to stderr so far (where most programs log).
    pub fn stderr(&self) -> Result<String> {
        read_lossy(&self.stderr_path)
    }

    /// The file stdout goes to.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// The file stderr goes to.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }
}

fn read_lossy(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

impl Drop for LabProcess {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // Not reaped yet, so the pid cannot have been reused: the group is still ours.
        let _ = self.child.kill();
        if let Err(e) = sys::signal("KILL", &[-i64::from(self.child.id())]) {
            eprintln!("ferrolb lab: {e:#}");
        }
        let _ = self.child.wait();
    }
}
