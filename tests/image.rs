//! The image as a node runs it: built by image/build without a container engine, run by
//! a real OCI runtime (runc, Debian's), `ferrolb --version` works in it, and the speaker
//! in it joins a lab node's network namespace (hostNetwork) with exactly NET_RAW and
//! NET_ADMIN, answers ARP for its VIP and installs its forwarding rules with the image's
//! own `nft`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferrolb::lab::{Lab, poll_until};

const VIP: &str = "192.0.2.200";

fn build_image(out: &Path) -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/image/build");
    let run = Command::new("bash")
        .args([script, "--binary", env!("CARGO_BIN_EXE_ferrolb"), "--out"])
        .arg(out)
        .args(["--tag", "test"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "image/build failed (it needs umoci and nftables: apt-get install umoci nftables): {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    eprintln!("{}", stderr.lines().last().unwrap_or_default());
    out.join("oci")
}

/// An OCI runtime bundle of the image, with `edit` applied to its config.json.
fn bundle(layout: &Path, dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let bundle = dir.join("bundle");
    let unpack = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:test", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        unpack.status.success(),
        "{}",
        String::from_utf8_lossy(&unpack.stderr)
    );
    let path = bundle.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["process"]["terminal"] = false.into();
    config["root"]["readonly"] = true.into();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
    bundle
}

fn runc() -> Command {
    assert!(
        Command::new("runc").arg("--version").output().is_ok(),
        "runc is not installed (apt-get install runc)"
    );
    Command::new("runc")
}

/// A container run by runc in the background, killed and deleted when dropped.
struct Container {
    id: String,
    child: Child,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = runc().args(["kill", &self.id, "KILL"]).output();
        let _ = self.child.wait();
        let _ = runc().args(["delete", "--force", &self.id]).output();
    }
}

#[test]
fn ferrolb_version_runs_in_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let layout = build_image(&dir.path().join("image"));
    let bundle = bundle(&layout, dir.path(), |c| {
        c["process"]["args"] = serde_json::json!(["/usr/local/bin/ferrolb", "--version"]);
    });
    let id = format!("ferrolb-version-{}", std::process::id());
    let out = runc()
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = runc().args(["delete", "--force", &id]).output();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ferrolb {}", env!("CARGO_PKG_VERSION"))
    );
}

/// CI sets CARGO_CYCLONEDX (.ci/run installs cargo-cyclonedx): the image comes with its
/// bill of materials, naming the crates in the binary and the Debian packages beside it.
#[test]
fn the_image_comes_with_a_bill_of_materials() {
    assert!(
        std::env::var_os("CARGO_CYCLONEDX").is_some(),
        "CARGO_CYCLONEDX is not set: .ci/run installs cargo-cyclonedx and sets it"
    );
    let dir = tempfile::tempdir().unwrap();
    build_image(&dir.path().join("image"));
    let sbom = dir.path().join("image/ferrolb-test.cdx.json");
    let sbom: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&sbom).expect("the SBOM beside the archive"))
            .expect("the SBOM is JSON");
    assert_eq!(sbom["bomFormat"], "CycloneDX");
    let names: Vec<&str> = sbom["components"]
        .as_array()
        .expect("components")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for wanted in ["ferrolb-speaker", "tokio", "foca", "nftables", "libc6"] {
        assert!(
            names.contains(&wanted),
            "no {wanted} in the SBOM: {names:?}"
        );
    }
}

#[test]
fn the_speaker_runs_in_the_image_with_only_net_raw_and_net_admin() {
    if let Err(missing) = Lab::check_prerequisites() {
        panic!("{missing}");
    }
    let dir = tempfile::tempdir().unwrap();
    let layout = build_image(&dir.path().join("image"));
    let lab = Lab::new(1).unwrap();
    let node = lab.node(0);
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(manifests.join("nodes.yaml"), lab.node_manifests()).unwrap();
    std::fs::write(
        manifests.join("objects.yaml"),
        format!(
            "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {{name: lab}}\n\
             spec: {{addresses: [{VIP}/32]}}\n---\n\
             apiVersion: ferrolb.io/v1beta1\nkind: L2Advertisement\nmetadata: {{name: lab}}\n\
             spec: {{forwarding: nodePort}}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\n\
             spec: {{type: LoadBalancer, ports: [{{port: 80, nodePort: 30080, protocol: TCP}}]}}\n"
        ),
    )
    .unwrap();
    let netns = format!("/run/netns/{}", node.netns());
    let caps = serde_json::json!(["CAP_NET_RAW", "CAP_NET_ADMIN"]);
    let bundle = bundle(&layout, dir.path(), |c| {
        c["process"]["args"] = serde_json::json!([
            "/usr/local/bin/ferrolb",
            "speaker",
            "--manifests",
            "/manifests",
            "--node-name",
            node.name(),
            "--no-membership"
        ]);
        // As the chart's DaemonSet: uid 0 for the two capabilities, and nothing else.
        c["process"]["user"] = serde_json::json!({"uid": 0, "gid": 0});
        c["process"]["noNewPrivileges"] = true.into();
        for set in ["bounding", "effective", "permitted"] {
            c["process"]["capabilities"][set] = caps.clone();
        }
        c["process"]["capabilities"]["inheritable"] = serde_json::json!([]);
        c["process"]["capabilities"]["ambient"] = serde_json::json!([]);
        // hostNetwork: the node's own network namespace.
        for ns in c["linux"]["namespaces"].as_array_mut().unwrap() {
            if ns["type"] == "network" {
                ns["path"] = netns.clone().into();
            }
        }
        c["mounts"].as_array_mut().unwrap().push(serde_json::json!({
            "destination": "/manifests", "type": "bind",
            "source": manifests.display().to_string(), "options": ["rbind", "ro"],
        }));
    });
    let id = format!("ferrolb-speaker-{}", std::process::id());
    let log = std::fs::File::create(dir.path().join("speaker.log")).unwrap();
    let child = runc()
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg(&id)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let container = Container { id, child };
    let logs = || std::fs::read_to_string(dir.path().join("speaker.log")).unwrap_or_default();

    let mac = poll_until(Duration::from_secs(15), "an ARP answer for the VIP", || {
        lab.client()
            .arping(VIP.parse::<std::net::IpAddr>().unwrap())
            .first()
            .copied()
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
    assert_eq!(mac, node.mac());
    let table = poll_until(Duration::from_secs(15), "the forwarding rules", || {
        let out = node.run("nft", ["list", "table", "inet", "ferrolb"]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains(VIP).then_some(text)
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs()));
    assert!(table.contains("30080"), "{table}");

    // The speaker process holds exactly those two capabilities.
    let state = runc().args(["state", &container.id]).output().unwrap();
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).unwrap();
    let pid = state["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let cap_eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    // CAP_NET_ADMIN is bit 12, CAP_NET_RAW bit 13.
    assert_eq!(
        u64::from_str_radix(&cap_eff, 16).unwrap(),
        (1 << 12) | (1 << 13)
    );
    drop(container);
}
