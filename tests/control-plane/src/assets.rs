//! Where the control-plane binaries come from: `KUBEBUILDER_ASSETS` (the envtest
//! convention), else the cache that `tests/control-plane/build` fills, built on first use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// Every binary the harness and the tests run.
pub const BINARIES: [&str; 5] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
    "helm",
];

/// The build script beside this crate.
pub fn build_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("build")
}

/// The directory holding all of [`BINARIES`], building them the first time (10 to 15
/// minutes on two cores; later calls reuse the cache). Fails, naming what to install or
/// set, when they can be neither found nor built: a Kubernetes test never passes
/// without a control plane.
pub fn directory() -> Result<PathBuf> {
    // One build per process; other processes wait on the script's own lock.
    static FOUND: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut found = FOUND.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dir) = found.as_ref() {
        return Ok(dir.clone());
    }
    let dir = locate()?;
    *found = Some(dir.clone());
    Ok(dir)
}

fn locate() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KUBEBUILDER_ASSETS").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let missing: Vec<&str> = BINARIES
            .iter()
            .copied()
            .filter(|b| !dir.join(b).is_file())
            .collect();
        if missing.is_empty() {
            return Ok(dir);
        }
        bail!(
            "KUBEBUILDER_ASSETS={} lacks {}; unset it to build all five with {}, or point it at \
             the directory that script prints",
            dir.display(),
            missing.join(", "),
            build_script().display()
        );
    }
    let script = build_script();
    eprintln!(
        "control plane: asking {} for the binaries (built the first time: 10 to 15 minutes)",
        script.display()
    );
    let output = Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}: is bash installed?", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); the Kubernetes tests need Go 1.26 or newer on PATH to build the \
             control plane, or KUBEBUILDER_ASSETS naming a directory with {}",
            script.display(),
            output.status,
            BINARIES.join(", ")
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = stdout
        .lines()
        .last()
        .map(PathBuf::from)
        .context("the build script printed no directory")?;
    Ok(dir)
}

/// The path of one binary.
pub fn binary(name: &str) -> Result<PathBuf> {
    Ok(directory()?.join(name))
}
