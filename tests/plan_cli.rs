//! `ferrolb plan` as a user runs it: the real binary on files on disk.

use std::path::Path;
use std::process::{Command, Output};

fn ferrolb(args: &[&str], stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrolb"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input
        .write_all(stdin.unwrap_or_default().as_bytes())
        .unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_readme_example_plans_every_service() {
    let out = ferrolb(&["plan", "-f", "docs/examples/plan"], None);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let line = |svc: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(svc))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("default/legacy ").contains("192.0.2.12"), "{stdout}");
    assert!(line("default/dns ").contains("192.0.2.11"), "{stdout}");
    // The two share one IP per family; IPv4 is the only address left, IPv6 anywhere in
    // the /120.
    let ips = |svc: &str| {
        line(svc)
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(ips("shop/web-http "), ips("shop/web-https "), "{stdout}");
    let shared = ips("shop/web-http ");
    let (v4, v6) = shared.split_once(',').unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(v4, "192.0.2.10");
    let v6: std::net::Ipv6Addr = v6.parse().unwrap();
    assert_eq!(
        u128::from(v6) >> 8,
        u128::from("2001:db8::100".parse::<std::net::Ipv6Addr>().unwrap()) >> 8
    );
    assert!(
        line("tools/metrics ").contains("pending: pool \"office\" is exhausted"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("elsewhere"),
        "another class's Service is left alone: {stdout}"
    );
    assert!(
        line("office ")
            .split_whitespace()
            .eq(["office", "Ready", "3", "0", "0", "0"]),
        "{stdout}"
    );
}

#[test]
fn json_output_is_machine_readable() {
    let out = ferrolb(&["plan", "-f", "docs/examples/plan", "-o", "json"], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pools = v["pools"].as_array().unwrap();
    let v6 = pools.iter().find(|p| p["name"] == "shop-v6").unwrap();
    assert_eq!(v6["assignedIPv6"], "1");
    assert_eq!(v6["availableIPv6"], "255");
}

#[test]
fn yaml_output_reads_back() {
    let out = ferrolb(
        &[
            "plan",
            "-f",
            "docs/examples/plan/pools.yaml",
            "-f",
            "docs/examples/plan/services.yaml",
            "-o",
            "yaml",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_saphyr::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(v["services"].as_array().unwrap().len(), 5);
}

#[test]
fn an_ipv6_slash_64_counts_past_two_to_the_sixty_four() {
    let manifest = "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: big}\nspec: {addresses: [\"fd00::/56\"]}\n";
    let out = ferrolb(&["plan", "-f", "-", "-o", "json"], Some(manifest));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["pools"][0]["availableIPv6"], (1u128 << 72).to_string());
}

#[test]
fn invalid_input_names_file_document_and_object_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pools.yaml"),
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: ok}\nspec: {addresses: [10.0.0.0/24]}\n---\n\
         apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: typo}\nspec: {addresses: [10.1.0.5/24]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, annotations: {ferrolb.io/address-pool: typo}}\nspec: {type: LoadBalancer}\n",
    )
    .unwrap();
    let out = ferrolb(&["plan", "-f", dir.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    let pools = Path::new(dir.path()).join("pools.yaml");
    assert!(
        stderr.contains(&format!(
            "{}, document 2: pool \"typo\": spec.addresses[0]: \"10.1.0.5/24\" has host bits set",
            pools.display()
        )),
        "{stderr}"
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("pool \"typo\" is not usable"),
        "the plan still says what would happen: {stdout}"
    );
}

#[test]
fn unreadable_documents_stop_the_plan() {
    let out = ferrolb(
        &["plan", "-f", "-"],
        Some("apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: 80}\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("<stdin>, document 1 (Service \"s\"): spec.ports: invalid type"),
        "{stderr}"
    );
}

#[test]
fn a_missing_path_is_an_error() {
    let out = ferrolb(&["plan", "-f", "no/such/dir"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no/such/dir"));
}

#[test]
fn plan_predicts_the_controller_and_standalone_predicts_the_speakers() {
    let line = |args: &[&str]| {
        let out = ferrolb(args, None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .find(|l| l.starts_with("shop/web-http "))
            .unwrap_or_default()
            .to_string()
    };
    // The controller gives the lowest free address; standalone speakers start each
    // Service at its own hashed point.
    assert!(
        line(&["plan", "-f", "docs/examples/plan"]).contains("192.0.2.10,2001:db8::100 "),
        "{}",
        line(&["plan", "-f", "docs/examples/plan"])
    );
    assert!(
        line(&["plan", "-f", "docs/examples/plan", "--standalone"])
            .contains("192.0.2.10,2001:db8::1e4 "),
        "{}",
        line(&["plan", "-f", "docs/examples/plan", "--standalone"])
    );
}

#[test]
fn an_ip_whose_pool_was_deleted_is_kept_and_reported() {
    let manifest = "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: new}\nspec: {addresses: [10.1.0.0/24]}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {type: LoadBalancer}\n\
        status: {loadBalancer: {ingress: [{ip: 10.0.0.7}]}}\n";
    let out = ferrolb(&["plan", "-f", "-"], Some(manifest));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .contains("default/web  10.0.0.7     -     stranded: 10.0.0.7 is in no IPAddressPool;"),
        "{stdout}"
    );
}

#[test]
fn nothing_to_plan_is_said_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let empty_file = dir.path().join("empty.yaml");
    std::fs::write(&empty_file, "# nothing yet\n").unwrap();
    let empty_dir = dir.path().join("empty-dir");
    std::fs::create_dir(&empty_dir).unwrap();
    let no_yaml = dir.path().join("no-yaml");
    std::fs::create_dir(&no_yaml).unwrap();
    std::fs::write(no_yaml.join("README.md"), "pools go here\n").unwrap();
    let cases = [
        (
            vec!["plan", "-f", empty_file.to_str().unwrap()],
            format!(
                "error: nothing to plan: no IPAddressPool or Service in {}",
                empty_file.display()
            ),
        ),
        (
            vec!["plan", "-f", empty_dir.to_str().unwrap()],
            "error: nothing to plan: no .yaml, .yml or .json file found".to_string(),
        ),
        (
            vec!["plan", "-f", no_yaml.to_str().unwrap()],
            format!(
                "error: nothing to plan: no .yaml, .yml or .json file found; skipped {} \
                 (only .yaml, .yml and .json files are read)",
                no_yaml.join("README.md").display()
            ),
        ),
        (
            vec!["plan", "-f", "-"],
            "error: nothing to plan: no IPAddressPool or Service in <stdin>".to_string(),
        ),
    ];
    for (args, want) in cases {
        let out = ferrolb(&args, Some(""));
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
        assert_eq!(text(&out.stderr).trim_end(), want, "{args:?}");
    }
}

#[test]
fn a_syntax_error_names_the_file_document_and_line() {
    let manifest = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n\
        apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\n\
        apiVersion: v1\nkind: Service\nmetadata: [\n";
    let out = ferrolb(&["plan", "-f", "-"], Some(manifest));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(
            "error: <stdin>, document 3: not valid YAML: unclosed bracket '[' (line 11, column 11)\n"
        ),
        "{stderr}"
    );
    assert_eq!(stderr.matches("error:").count(), 2, "{stderr}");
    assert!(stderr.contains("--> <stdin>:11:11"), "{stderr}");
}

#[test]
fn a_file_of_eleven_hundred_services_is_planned() {
    let mut manifest = String::from(
        "apiVersion: ferrolb.io/v1beta1\nkind: IPAddressPool\nmetadata: {name: big}\nspec: {addresses: [10.0.0.0/16]}\n",
    );
    for i in 0..1100 {
        manifest.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i:04}}}\nspec: {{type: LoadBalancer}}\n"
        ));
    }
    let out = ferrolb(&["plan", "-f", "-", "-o", "json"], Some(&manifest));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["services"].as_array().unwrap().len(), 1100);
    assert_eq!(v["services"][1099]["ips"][0]["ip"], "10.0.4.75");
}
