//! `ferrolb import metallb` against a real API server holding MetalLB's configuration
//! (MetalLB's own CRDs, from its published module): what it reads from the cluster, and
//! the server-side check of what it writes against ferrolb's CRDs.

use std::process::{Command, Output};

use ferrolb_control_plane::ControlPlane;

const FERROLB_CRDS: &str = include_str!("../charts/ferrolb/crds/crds.yaml");
const EXAMPLE: &str = "docs/examples/migration/metallb";

fn metallb_crds() -> String {
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/metallb/crds"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tests/metallb/crds failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn import(cp: &ControlPlane, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrolb"))
        .args(["import", "metallb", "--kubeconfig"])
        .arg(cp.admin_kubeconfig())
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn wait_established(cp: &ControlPlane, crds: &[&str]) {
    let mut args = vec!["wait", "--for=condition=Established", "--timeout=30s"];
    args.extend_from_slice(crds);
    cp.kubectl_run(&args, None).unwrap();
}

#[tokio::test]
async fn imports_a_live_metallb_configuration_and_the_server_accepts_it() {
    let cp = ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    cp.apply(&metallb_crds()).unwrap();
    wait_established(
        &cp,
        &[
            "crd/ipaddresspools.metallb.io",
            "crd/l2advertisements.metallb.io",
            "crd/bgpadvertisements.metallb.io",
            "crd/bgppeers.metallb.io",
        ],
    );
    cp.kubectl_run(&["create", "namespace", "metallb-system"], None)
        .unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    // All of it but the BGPPeer: MetalLB's BGPPeer schema (an int32 maximum on its ASNs)
    // is refused by this API server, a MetalLB matter.
    let config = std::fs::read_to_string(format!("{root}/{EXAMPLE}/config.yaml")).unwrap();
    let without_peer: Vec<&str> = config
        .split("\n---\n")
        .filter(|d| !d.contains("kind: BGPPeer"))
        .collect();
    cp.apply(&without_peer.join("\n---\n")).unwrap();
    // The test control plane serves IPv4 Services only: web stays single-stack here.
    let services = std::fs::read_to_string(format!("{root}/{EXAMPLE}/services.yaml"))
        .unwrap()
        .replace(
            "      ipFamilyPolicy: PreferDualStack\n      ipFamilies: [IPv4, IPv6]\n",
            "",
        );
    cp.apply(&services).unwrap();
    // The API server keeps no status from a create: write what MetalLB had written.
    for (ns, name, ingress) in [
        ("shop", "web", r#"[{"ip":"192.168.10.1"}]"#),
        ("billing", "api", r#"[{"ip":"192.168.10.2"}]"#),
        ("shop", "dns", r#"[{"ip":"192.168.10.201"}]"#),
        ("shop", "dns-tcp", r#"[{"ip":"192.168.10.201"}]"#),
    ] {
        let patch = format!(r#"{{"status":{{"loadBalancer":{{"ingress":{ingress}}}}}}}"#);
        cp.kubectl_run(
            &[
                "patch",
                "svc",
                name,
                "-n",
                ns,
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch,
            ],
            None,
        )
        .unwrap();
    }

    // From the cluster: the same objects as from the files, every Service checked.
    let live = import(&cp, &[]);
    let stderr = text(&live.stderr);
    assert!(live.status.success(), "{stderr}");
    let from_files = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
        .args(["import", "metallb", "-f", EXAMPLE])
        .current_dir(root)
        .output()
        .unwrap();
    assert_eq!(text(&live.stdout), text(&from_files.stdout), "{stderr}");
    assert!(
        stderr.contains("Services: 4 keep their IPs, 0 would change IP"),
        "{stderr}"
    );
    assert!(
        stderr
            .contains("BGPAdvertisement \"metallb-system/upstream\": ferrolb announces by Layer 2"),
        "{stderr}"
    );

    // The server-side check needs ferrolb's CRDs, and says so.
    let without = import(&cp, &["--dry-run=server"]);
    assert_eq!(without.status.code(), Some(1), "{}", text(&without.stderr));
    assert!(
        text(&without.stderr).contains("ferrolb's CRDs are not installed"),
        "{}",
        text(&without.stderr)
    );
    cp.apply(FERROLB_CRDS).unwrap();
    wait_established(
        &cp,
        &[
            "crd/ipaddresspools.ferrolb.io",
            "crd/l2advertisements.ferrolb.io",
        ],
    );
    let checked = import(&cp, &["--dry-run=server"]);
    assert!(checked.status.success(), "{}", text(&checked.stderr));
    assert!(
        text(&checked.stderr)
            .contains("the API server accepts all 4 object(s) (dry run: nothing was stored)"),
        "{}",
        text(&checked.stderr)
    );
    let stored = cp
        .kubectl_run(&["get", "ipaddresspools.ferrolb.io", "-o", "name"], None)
        .unwrap();
    assert_eq!(stored.trim(), "", "a dry run stores nothing");

    // What ferrolb's CRD refuses and MetalLB's does not (more than 64 interfaces) is
    // named with the server's reason.
    let interfaces: Vec<String> = (0..65).map(|i| format!("\"eth{i}\"")).collect();
    cp.kubectl_run(
        &[
            "patch",
            "l2advertisements.metallb.io",
            "reserved",
            "-n",
            "metallb-system",
            "--type=merge",
            "-p",
            &format!(r#"{{"spec":{{"interfaces":[{}]}}}}"#, interfaces.join(",")),
        ],
        None,
    )
    .unwrap();
    let refused = import(&cp, &["--dry-run=server"]);
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: the API server refuses L2Advertisement \"reserved\"")
            && stderr.contains("spec.interfaces"),
        "{stderr}"
    );
}

/// kube-vip's ConfigMap, read from the cluster: no CRDs needed.
#[tokio::test]
async fn imports_kube_vips_configmap_from_the_cluster() {
    let cp = ControlPlane::start()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let root = env!("CARGO_MANIFEST_DIR");
    for file in ["kubevip.yaml", "services.yaml"] {
        cp.kubectl_run(
            &[
                "apply",
                "-f",
                &format!("{root}/docs/examples/migration/kube-vip/{file}"),
            ],
            None,
        )
        .unwrap();
    }
    cp.kubectl_run(
        &[
            "patch",
            "svc",
            "web",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"loadBalancer":{"ingress":[{"ip":"192.168.0.217"}]}}}"#,
        ],
        None,
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
        .args(["import", "kube-vip", "--kubeconfig"])
        .arg(cp.admin_kubeconfig())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        text(&out.stdout).contains("name: kube-vip-global"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        stderr.contains("Services: 1 keep their IPs, 0 would change IP"),
        "{stderr}"
    );
}
