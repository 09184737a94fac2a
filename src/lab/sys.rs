//! Thin helpers around the programs the lab drives (`ip`, `sh`) and `/proc`.
//!
//! Signals go through the shell's `kill` builtin (one process for many targets, process
//! groups included, and a target that vanished meanwhile is no error); which processes
//! are in which namespace is read from `/proc`.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

/// Where `ip netns add` keeps its named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// A command line as a user would type it, for error messages.
pub(crate) fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` to completion (stdin closed, output captured) and fails, naming `who` and
/// the command line with its stderr, unless it exits 0.
pub(crate) fn run(who: &str, cmd: &mut Command) -> Result<Output> {
    run_with_input(who, cmd, None)
}

/// Like [`run`], feeding `input` on stdin (for `ip -batch -`).
pub(crate) fn run_with_input(who: &str, cmd: &mut Command, input: Option<&str>) -> Result<Output> {
    let line = display(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{who}: cannot start `{line}`"))?;
    if let Some(input) = input {
        let mut stdin = child.stdin.take().context("stdin was requested")?;
        // A write error here means the program exited early; its status says why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child
        .wait_with_output()
        .with_context(|| format!("{who}: waiting for `{line}`"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let detail = if stderr.trim().is_empty() {
            stdout.trim()
        } else {
            stderr.trim()
        };
        bail!("{who}: `{line}` failed ({}): {detail}", output.status);
    }
    Ok(output)
}

/// Runs `ip [-n NETNS] [-force] -batch -` with `lines`: one process for many changes, which
/// keeps building a lab fast.
pub(crate) fn ip_batch(
    who: &str,
    netns: Option<&str>,
    force: bool,
    lines: &[String],
) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    if force {
        cmd.arg("-force");
    }
    cmd.args(["-batch", "-"]);
    let mut input = lines.join("\n");
    input.push('\n');
    run_with_input(who, &mut cmd, Some(&input))
        .map(drop)
        .with_context(|| format!("batch was:\n{input}"))
}

/// Sends `signal` (a name such as `TERM` or `KILL`) to each target; a negative target is a
/// process group. Targets that no longer exist are not an error.
pub(crate) fn signal(signal: &str, targets: &[i64]) -> Result<()> {
    if targets.is_empty() {
        return Ok(());
    }
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#"s=$1; shift; kill -s "$s" -- "$@""#, "sh", signal]);
    cmd.args(targets.iter().map(i64::to_string));
    let line = display(&cmd);
    let output = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot start `{line}`"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // dash reports each vanished target as "No such process" and exits 1.
    let real_errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("No such process"))
        .collect();
    if !output.status.success() && !real_errors.is_empty() {
        bail!(
            "sending SIG{signal} with `{line}` failed: {}",
            real_errors.join("; ")
        );
    }
    Ok(())
}

/// Whether a process with this pid exists (in our pid namespace).
pub(crate) fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Named network namespaces (`ip netns list`), read from the directory to save a process.
pub(crate) fn named_netns() -> Result<Vec<String>> {
    match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => {
            let mut names = Vec::new();
            for entry in entries {
                let entry = entry.with_context(|| format!("reading {NETNS_DIR}"))?;
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
            Ok(names)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {NETNS_DIR}")),
    }
}

pub(crate) fn netns_exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Opens a named namespace and returns it with its inode (what `/proc/PID/ns/net` of its
/// members points at). While the file is open the namespace, and so its inode number,
/// stays allocated: no namespace created meanwhile can be mistaken for it.
fn open_netns(name: &str) -> Option<(std::fs::File, u64)> {
    let file = std::fs::File::open(Path::new(NETNS_DIR).join(name)).ok()?;
    let ino = file.metadata().ok()?.ino();
    Some((file, ino))
}

/// Pids of every process whose network namespace has one of these inodes (what
/// `ip netns pids` does, for many namespaces in one pass over `/proc`).
fn pids_in_netns(inodes: &[u64]) -> Vec<i64> {
    if inodes.is_empty() {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i64>().ok())
        .filter(|pid| {
            // "net:[4026532345]"; processes that vanished meanwhile are skipped.
            std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .ok()
                .and_then(|target| {
                    let target = target.to_string_lossy().into_owned();
                    target
                        .strip_prefix("net:[")?
                        .strip_suffix(']')?
                        .parse::<u64>()
                        .ok()
                })
                .is_some_and(|ino| inodes.contains(&ino))
        })
        .collect()
}

/// Kills every process inside the named namespaces, then deletes the namespaces (which
/// removes their veths and bridge). Namespaces already gone are fine; ones still present
/// afterwards are an error.
pub(crate) fn destroy_netns(who: &str, netns: &[String]) -> Result<()> {
    let present: Vec<String> = netns.iter().filter(|n| netns_exists(n)).cloned().collect();
    if present.is_empty() {
        return Ok(());
    }
    let (_held, inodes): (Vec<std::fs::File>, Vec<u64>) =
        present.iter().filter_map(|n| open_netns(n)).unzip();
    let mut killed = signal("KILL", &pids_in_netns(&inodes));
    let lines: Vec<String> = present.iter().map(|n| format!("netns del {n}")).collect();
    // -force: keep deleting the rest when one fails (e.g. a parallel cleanup won the race).
    let deleted = ip_batch(who, None, true, &lines);
    // A process that was still entering a namespace during the first sweep (an
    // `ip netns exec` started just before teardown) is inside it now, and with the name
    // gone nothing could find it later: sweep by inode until the namespaces are empty.
    for _ in 0..100 {
        let late = pids_in_netns(&inodes);
        if late.is_empty() {
            break;
        }
        killed = killed.and(signal("KILL", &late));
        std::thread::sleep(super::POLL_INTERVAL);
    }
    let left: Vec<&String> = present.iter().filter(|n| netns_exists(n)).collect();
    if !left.is_empty() {
        let mut err = anyhow::anyhow!(
            "{who}: network namespaces still present after teardown: {}",
            left.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Err(e) = deleted {
            err = e.context(err);
        }
        return Err(err);
    }
    killed.with_context(|| format!("{who}: killing processes left in the lab"))
}

/// The effective uid, from `/proc/self/status`.
pub(crate) fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Whether `program` is an executable file somewhere on `PATH`.
pub(crate) fn on_path(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_quoted_only_where_needed() {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", "ns-1", "sh", "-c", "echo it's"]);
        assert_eq!(display(&cmd), r#"ip netns exec ns-1 sh -c 'echo it'\''s'"#);
    }
}
