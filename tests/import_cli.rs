//! `ferrolb import metallb -f` as a user runs it: the real binary on MetalLB's
//! configuration files, then `ferrolb plan` on what it wrote.

use std::collections::BTreeMap;
use std::process::{Command, Output};

fn ferrolb(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrolb"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

const EXAMPLE: &str = "docs/examples/migration/metallb";

#[test]
fn the_documented_example_converts_and_no_service_moves() {
    let out = ferrolb(&["import", "metallb", "-f", EXAMPLE]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    let kinds: Vec<(String, String)> = stdout
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .map(|d| {
            let v: serde_json::Value = serde_saphyr::from_str(d).unwrap();
            (
                v["kind"].as_str().unwrap().to_string(),
                v["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected = [
        ("IPAddressPool", "production"),
        ("IPAddressPool", "reserved"),
        ("L2Advertisement", "front"),
        ("L2Advertisement", "reserved"),
    ];
    assert_eq!(
        kinds,
        expected.map(|(k, n)| (k.to_string(), n.to_string())),
        "{stdout}"
    );
    assert!(
        stderr
            .contains("BGPAdvertisement \"metallb-system/upstream\": ferrolb announces by Layer 2"),
        "{stderr}"
    );
    assert!(
        stderr.contains("BGPPeer \"metallb-system/tor\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("Services: 4 keep their IPs, 0 would change IP"),
        "{stderr}"
    );

    let strict = ferrolb(&["import", "metallb", "--strict", "-f", EXAMPLE]);
    assert_eq!(strict.status.code(), Some(1), "{}", text(&strict.stderr));
    assert!(
        text(&strict.stderr)
            .contains("2 part(s) of MetalLB's configuration are not carried over (--strict)"),
        "{}",
        text(&strict.stderr)
    );
}

/// What import promises, checked with the other command: the pools it writes, planned
/// with the cluster's Services, give each Service the IPs it holds.
#[test]
fn plan_gives_every_service_the_ips_it_holds_under_the_imported_pools() {
    let dir = std::env::temp_dir().join(format!("ferrolb-import-{}", std::process::id()));
    let out = ferrolb(&[
        "import",
        "metallb",
        "-f",
        &format!("{EXAMPLE}/config.yaml"),
        "-o",
        dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "-o writes files, not stdout");
    let plan = ferrolb(&[
        "plan",
        "-f",
        dir.to_str().unwrap(),
        "-f",
        &format!("{EXAMPLE}/services.yaml"),
        "-o",
        "json",
    ]);
    assert!(plan.status.success(), "{}", text(&plan.stderr));
    let report: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let planned: BTreeMap<String, Vec<String>> = report["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ips = s["ips"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|i| i["ip"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default();
            (s["service"].as_str().unwrap().to_string(), ips)
        })
        .collect();
    let held = |ips: &[&str]| ips.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(planned["shop/web"], held(&["192.168.10.1", "fd00:10::"]));
    assert_eq!(planned["billing/api"], held(&["192.168.10.2"]));
    assert_eq!(planned["shop/dns"], held(&["192.168.10.201"]));
    assert_eq!(planned["shop/dns-tcp"], held(&["192.168.10.201"]));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn services_that_would_change_ip_are_named_and_fail_the_import() {
    let dir = std::env::temp_dir().join(format!("ferrolb-import-moves-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let services = dir.join("services.yaml");
    std::fs::write(
        &services,
        "apiVersion: v1\nkind: Service\nmetadata: {name: office, namespace: default}\n\
         spec: {type: LoadBalancer, ports: [{port: 80}]}\n\
         status: {loadBalancer: {ingress: [{ip: 192.168.1.241}]}}\n---\n\
         apiVersion: v1\nkind: Service\n\
         metadata: {name: pinned, namespace: default, annotations: {metallb.universe.tf/address-pool: Office_LAN}}\n\
         spec: {type: LoadBalancer, ports: [{port: 80}]}\n\
         status: {loadBalancer: {ingress: [{ip: 192.168.1.242}]}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: routed, namespace: default}\n\
         spec: {type: LoadBalancer, ports: [{port: 80}]}\n\
         status: {loadBalancer: {ingress: [{ip: 198.51.100.9}]}}\n",
    )
    .unwrap();
    let out = ferrolb(&[
        "import",
        "metallb",
        "-f",
        "docs/examples/migration/metallb-0.12/configmap.yaml",
        "-f",
        services.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "Services: 1 keep their IPs, 1 would change IP, 1 would keep IPs nobody announces"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "error: Service default/pinned would change IP: it would lose 192.168.1.242:"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("Office_LAN"), "{stderr}");
    assert!(
        stderr.contains("error: Service default/routed would keep its IP but lose its traffic: 198.51.100.9 is in MetalLB's pool \"datacenter\", which MetalLB announces by BGP only"),
        "{stderr}"
    );
    assert!(stderr.contains("renamed \"office-lan\""), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_metallb_configuration_is_an_error_that_says_what_was_looked_for() {
    let out = ferrolb(&["import", "metallb", "-f", "docs/examples/plan"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("error: no MetalLB configuration in the files given"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn ciliums_documented_example_converts_and_no_service_moves() {
    let out = ferrolb(&["import", "cilium", "-f", "docs/examples/migration/cilium"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("  - 192.168.20.1-192.168.20.14\n  - 192.168.20.100-192.168.20.110\n"),
        "{stdout}"
    );
    assert!(stdout.contains("    namespaces:\n    - shop\n"), "{stdout}");
    assert!(stdout.contains("  interfaces:\n  - eth0\n"), "{stdout}");
    assert!(
        stderr.contains(
            "converted 3 Cilium object(s) into 2 IPAddressPool(s) and 1 L2Advertisement(s)"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("Services: 2 keep their IPs, 0 would change IP"),
        "{stderr}"
    );
}

#[test]
fn kube_vips_documented_example_converts_and_no_service_moves() {
    let out = ferrolb(&[
        "import",
        "kube-vip",
        "-f",
        "docs/examples/migration/kube-vip",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(
            "name: kube-vip-global\nspec:\n  addresses:\n  - 192.168.0.217-192.168.0.222\n"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("kind: L2Advertisement\nmetadata:\n  name: kube-vip\n"),
        "{stdout}"
    );
    assert!(
        stderr.contains("range-shop is never used by kube-vip"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Services: 1 keep their IPs, 0 would change IP"),
        "{stderr}"
    );
}
