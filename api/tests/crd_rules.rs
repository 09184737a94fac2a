//! The CEL rules in the generated CRDs, evaluated as the API server would on
//! `kubectl apply` (client-side, by kube-cel), so a malformed pool is refused at once.

use ferrolb_api::address::{AddressError, parse_range};
use ferrolb_api::{IPAddressPool, L2Advertisement};
use kube::CustomResourceExt;
use proptest::prelude::*;
use serde_json::{Value, json};

fn pool_schema() -> Value {
    let crd = IPAddressPool::crd();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .unwrap()
        .open_api_v3_schema
        .as_ref()
        .unwrap();
    serde_json::to_value(schema).unwrap()
}

fn pool_with(addresses: &[&str]) -> Value {
    json!({
        "apiVersion": "ferrolb.io/v1beta1",
        "kind": "IPAddressPool",
        "metadata": {"name": "lab"},
        "spec": {"addresses": addresses},
    })
}

fn errors(addresses: &[&str]) -> Vec<String> {
    match kube_cel::validate(&pool_schema(), &pool_with(addresses), None) {
        Ok(()) => vec![],
        Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn well_formed_entries_pass() {
    let ok = [
        "192.168.10.0/24",
        "fd00::/120",
        "192.168.10.10-192.168.10.20",
        "192.168.10.10 - 192.168.10.20",
        "fd00::10-fd00::20",
        "10.0.0.7",
        "10.0.0.7/32",
        "fd00::7/128",
    ];
    for entry in ok {
        assert_eq!(errors(&[entry]), Vec::<String>::new(), "{entry}");
    }
}

#[test]
fn malformed_entries_are_refused_with_a_readable_message() {
    let cases = [
        ("banana", "must be a CIDR"),
        ("10.0.0.1-", "must be a CIDR"),
        ("10.0.0.1-fd00::1", "must be a CIDR"),
        ("10.0.0.256", "must be a CIDR"),
        ("192.168.10.5/24", "host bits set"),
        ("0.0.0.0/0", "covers the whole address family"),
    ];
    for (entry, want) in cases {
        let errs = errors(&[entry]);
        assert!(errs.iter().any(|e| e.contains(want)), "{entry}: {errs:?}");
        assert!(
            errs.iter().all(|e| e.contains("spec.addresses")),
            "{entry}: {errs:?}"
        );
    }
}

#[test]
fn crds_are_cluster_scoped_with_status_and_columns() {
    for crd in [IPAddressPool::crd(), L2Advertisement::crd()] {
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, "ferrolb.io");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1beta1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        assert!(
            v.additional_printer_columns
                .as_ref()
                .is_some_and(|c| !c.is_empty())
        );
    }
}

#[test]
fn forwarding_is_an_enum_the_server_checks() {
    let crd = serde_json::to_value(L2Advertisement::crd()).unwrap();
    let forwarding = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"]["forwarding"];
    assert_eq!(
        forwarding["enum"],
        json!(["none", "nodePort"]),
        "{forwarding}"
    );
}

/// `ferrolb plan` and `kubectl apply` agree on every entry: whatever the parser takes,
/// the CRD's rules take; whatever they take, the parser takes too, except ranges that
/// end below their start (CEL cannot compare addresses; the pool is then Invalid).
fn agree(entry: &str) -> Result<(), String> {
    // kube-cel's isCIDR takes an octet or a prefix length with a leading zero
    // ("10.0.0.024/32", "fd00::/024"); the API server's (Go's netip) refuses both, as
    // plan does. tests/control_plane.rs checks that on the real server.
    if leading_zero_octet(entry) || leading_zero_prefix(entry) {
        return Ok(());
    }
    let cel = errors(&[entry]);
    match parse_range(entry) {
        Ok(_) if cel.is_empty() => Ok(()),
        Ok(_) => Err(format!(
            "{entry:?}: plan accepts, the API server refuses: {cel:?}"
        )),
        Err(AddressError::Reversed { .. }) => Ok(()),
        Err(e) if cel.is_empty() => Err(format!(
            "{entry:?}: plan refuses ({e}), the API server accepts"
        )),
        Err(_) => Ok(()),
    }
}

fn leading_zero_octet(entry: &str) -> bool {
    entry
        .split(|c: char| !c.is_ascii_digit())
        .any(|part| part.len() > 1 && part.starts_with('0'))
        && entry.contains('.')
}

fn leading_zero_prefix(entry: &str) -> bool {
    entry.split('/').skip(1).any(|after| {
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        digits.len() > 1 && digits.starts_with('0')
    })
}

#[test]
fn plan_and_the_crd_agree_on_tricky_entries() {
    let entries = [
        " 10.0.0.1",
        "10.0.0.1 ",
        "10.0.0.0/24 ",
        " 10.0.0.1 - 10.0.0.2 ",
        "192.0.2.0/255.255.255.0",
        "192.0.2.0/024",
        "192.0.2.0/+24",
        "::ffff:10.0.0.1",
        "::ffff:10.0.0.0/120",
        "10.0.0.1-::ffff:10.0.0.9",
        "fe80::1%eth0",
        "010.0.0.1",
        "10.0.0.1/32/8",
        "10.0.0.0/33",
        "fd00::/129",
        "::/0",
        "1.2.3.4-1.2.3.5-1.2.3.6",
    ];
    let problems: Vec<String> = entries.iter().filter_map(|e| agree(e).err()).collect();
    assert!(problems.is_empty(), "{problems:#?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn plan_and_the_crd_agree(
        parts in prop::collection::vec(
            prop::sample::select(vec![
                "10.0.0.0", "10.0.0.7", "192.0.2.255", "010.0.0.1", "fd00::", "fd00::7",
                "::ffff:10.0.0.1", "-", "/", " ", "\t", "24", "0", "024", "32", "33", "120",
                "255.255.255.0", "+8", "%eth0",
            ]),
            1..5,
        ),
    ) {
        let entry: String = parts.concat();
        prop_assert!(agree(&entry).is_ok(), "{}", agree(&entry).unwrap_err());
    }
}

#[test]
fn the_addresses_limit_is_the_crds() {
    let schema = pool_schema();
    assert_eq!(
        schema["properties"]["spec"]["properties"]["addresses"]["maxItems"],
        json!(ferrolb_api::pool::MAX_ADDRESSES)
    );
    assert_eq!(
        schema["properties"]["spec"]["properties"]["addresses"]["items"]["maxLength"],
        json!(ferrolb_api::address::MAX_ENTRY_LEN)
    );
}

fn spec_errors(spec: Value) -> Vec<String> {
    let pool = json!({
        "apiVersion": "ferrolb.io/v1beta1",
        "kind": "IPAddressPool",
        "metadata": {"name": "lab"},
        "spec": spec,
    });
    match kube_cel::validate(&pool_schema(), &pool, None) {
        Ok(()) => vec![],
        Err(errs) => errs.iter().map(|e| e.to_string()).collect(),
    }
}

#[test]
fn a_pool_takes_exactly_one_of_addresses_and_from_node_network() {
    assert_eq!(
        spec_errors(json!({"addresses": ["10.0.0.0/24"]})),
        Vec::<String>::new()
    );
    assert_eq!(
        spec_errors(json!({"fromNodeNetwork": {"size": 16}})),
        Vec::<String>::new()
    );
    assert_eq!(
        spec_errors(json!({"fromNodeNetwork": {"size": 4, "families": ["IPv4", "IPv6"]}})),
        Vec::<String>::new()
    );
    for spec in [
        json!({}),
        json!({"addresses": []}),
        json!({"addresses": ["10.0.0.0/24"], "fromNodeNetwork": {"size": 16}}),
    ] {
        let errs = spec_errors(spec.clone());
        assert!(
            errs.iter()
                .any(|e| e.contains("set exactly one of spec.addresses")),
            "{spec}: {errs:?}"
        );
    }
}

#[test]
fn from_node_network_families_are_an_enum() {
    let crd = serde_json::to_value(IPAddressPool::crd()).unwrap();
    let families = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        ["fromNodeNetwork"]["properties"]["families"]["items"];
    assert_eq!(families["enum"], json!(["IPv4", "IPv6"]), "{families}");
}
