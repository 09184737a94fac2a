use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrolb_api::Family;
use ferrolb_api::address::{parse_range, to_u128};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use proptest::prelude::*;

use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pool(name: &str, addresses: &[&str]) -> PoolConfig {
    PoolConfig {
        name: name.into(),
        ranges: addresses.iter().map(|a| parse_range(a).unwrap()).collect(),
        usable: true,
        auto_assign: true,
        ..Default::default()
    }
}

fn svc(ns_name: &str) -> ServiceRequest {
    let (ns, name) = ns_name.split_once('/').unwrap();
    ServiceRequest {
        key: ServiceKey::new(ns, name),
        ports: vec![PortKey {
            port: 80,
            protocol: "TCP".into(),
        }],
        families: vec![Family::V4],
        ..Default::default()
    }
}

fn with_port(mut s: ServiceRequest, port: i32) -> ServiceRequest {
    s.ports = vec![PortKey {
        port,
        protocol: "TCP".into(),
    }];
    s
}

fn shared(mut s: ServiceRequest, key: &str) -> ServiceRequest {
    s.sharing_key = Some(key.into());
    s
}

/// As the cluster controller allocates.
fn run(pools: Vec<PoolConfig>, services: &[ServiceRequest]) -> Plan {
    plan(pools, BTreeMap::new(), services, Start::Lowest)
}

/// As standalone speakers allocate.
fn run_hashed(pools: Vec<PoolConfig>, services: &[ServiceRequest]) -> Plan {
    plan(pools, BTreeMap::new(), services, Start::Hashed)
}

fn stranded_reason(p: &Plan, key: &str) -> String {
    let (ns, name) = key.split_once('/').unwrap();
    match &p.services[&ServiceKey::new(ns, name)] {
        Outcome::Stranded { reason, .. } => reason.clone(),
        other => panic!("{key} is not stranded: {other:?}"),
    }
}

/// The Services with the IPs of `p` as their status, as the controller would read
/// them back.
fn with_status(services: &[ServiceRequest], p: &Plan) -> Vec<ServiceRequest> {
    services
        .iter()
        .map(|s| {
            let mut s = s.clone();
            s.current = p.services[&s.key]
                .assignments()
                .iter()
                .map(|a| a.ip)
                .collect();
            s
        })
        .collect()
}

fn ips_of(p: &Plan, key: &str) -> Vec<String> {
    let (ns, name) = key.split_once('/').unwrap();
    p.services[&ServiceKey::new(ns, name)]
        .assignments()
        .iter()
        .map(|a| a.ip.to_string())
        .collect()
}

fn pools_of(p: &Plan, key: &str) -> Vec<String> {
    let (ns, name) = key.split_once('/').unwrap();
    p.services[&ServiceKey::new(ns, name)]
        .assignments()
        .iter()
        .map(|a| a.pool.clone())
        .collect()
}

fn reason_of(p: &Plan, key: &str) -> String {
    let (ns, name) = key.split_once('/').unwrap();
    match &p.services[&ServiceKey::new(ns, name)] {
        Outcome::Pending { reason, .. } => reason.clone(),
        other => panic!("{key} is not pending: {other:?}"),
    }
}

#[test]
fn services_in_name_order_fill_the_pool_then_wait() {
    let p = run(
        vec![pool("a", &["10.0.0.10-10.0.0.11"])],
        &[svc("default/c"), svc("default/a"), svc("default/b")],
    );
    let mut got = [ips_of(&p, "default/a"), ips_of(&p, "default/b")].concat();
    got.sort();
    assert_eq!(got, ["10.0.0.10", "10.0.0.11"]);
    assert_eq!(reason_of(&p, "default/c"), "pool \"a\" is exhausted");
    assert_eq!(p.pools[0].assigned.ipv4, 2);
    assert_eq!(p.pools[0].available.ipv4, 0);
}

#[test]
fn current_ips_are_kept_even_when_a_lower_one_is_free() {
    let mut b = svc("default/b");
    b.current = vec![ip("10.0.0.7")];
    let p = run(vec![pool("a", &["10.0.0.0/24"])], &[svc("default/a"), b]);
    assert_eq!(ips_of(&p, "default/b"), ["10.0.0.7"]);
    assert_ne!(ips_of(&p, "default/a"), ["10.0.0.7"]);
}

#[test]
fn a_current_ip_outside_every_pool_is_kept_and_reported() {
    let mut a = svc("default/a");
    a.current = vec![ip("192.168.1.1")];
    let mut wants = svc("default/wants");
    wants.requested = vec![ip("192.168.1.1")];
    let p = run(vec![pool("a", &["10.0.0.0/24"])], &[a, wants]);
    assert_eq!(ips_of(&p, "default/a"), ["192.168.1.1"]);
    assert_eq!(pools_of(&p, "default/a"), [""]);
    assert_eq!(
        stranded_reason(&p, "default/a"),
        "192.168.1.1 is in no IPAddressPool; the Service keeps it until it asks for another IP or pool, or is deleted"
    );
    assert_eq!(
        reason_of(&p, "default/wants"),
        "requested 192.168.1.1 is in no pool"
    );
}

#[test]
fn requested_ip_is_honoured_and_not_taken_by_an_earlier_automatic_pick() {
    let mut z = svc("default/z");
    z.requested = vec![ip("10.0.0.0")];
    // Whatever the other Service's own starting point, the request is served first.
    for n in 0..8 {
        let name = format!("default/a{n}");
        let p = run(vec![pool("a", &["10.0.0.0/30"])], &[svc(&name), z.clone()]);
        assert_eq!(ips_of(&p, "default/z"), ["10.0.0.0"]);
        assert_ne!(ips_of(&p, &name), ["10.0.0.0"]);
    }
}

#[test]
fn requested_ip_problems_are_explained() {
    let mut outside = svc("default/outside");
    outside.requested = vec![ip("10.9.9.9")];
    let mut taken = svc("default/taken");
    taken.requested = vec![ip("10.0.0.1")];
    let mut holder = svc("default/holder");
    holder.current = vec![ip("10.0.0.1")];
    let p = run(vec![pool("a", &["10.0.0.0/24"])], &[outside, taken, holder]);
    assert_eq!(
        reason_of(&p, "default/outside"),
        "requested 10.9.9.9 is in no pool"
    );
    assert_eq!(
        reason_of(&p, "default/taken"),
        "requested 10.0.0.1 is used by default/holder, and this Service has no allow-shared-ip key"
    );
}

#[test]
fn address_pool_annotation_restricts_and_unlocks_manual_pools() {
    let mut manual = pool("manual", &["10.1.0.0/24"]);
    manual.auto_assign = false;
    let mut asks = svc("default/asks");
    asks.pool = Some("manual".into());
    let mut missing = svc("default/missing");
    missing.pool = Some("nope".into());
    let p = run(
        vec![pool("auto", &["10.0.0.0/24"]), manual],
        &[asks, missing, svc("default/plain")],
    );
    assert_eq!(pools_of(&p, "default/asks"), ["manual"]);
    assert_eq!(pools_of(&p, "default/plain"), ["auto"]);
    assert_eq!(
        reason_of(&p, "default/missing"),
        "pool \"nope\" (annotation ferrolb.io/address-pool) does not exist"
    );
}

#[test]
fn auto_assign_false_pool_is_used_when_asked_by_ip() {
    let mut manual = pool("manual", &["10.1.0.0/24"]);
    manual.auto_assign = false;
    let mut by_ip = svc("default/by-ip");
    by_ip.requested = vec![ip("10.1.0.9")];
    let p = run(vec![manual], &[by_ip, svc("default/plain")]);
    assert_eq!(ips_of(&p, "default/by-ip"), ["10.1.0.9"]);
    assert_eq!(
        reason_of(&p, "default/plain"),
        "no IPv4 pool is open to this Service: pool \"manual\" has autoAssign false"
    );
}

#[test]
fn avoid_buggy_ips_skips_dot_zero_and_dot_255() {
    let mut a = pool("a", &["10.0.0.254-10.0.1.1"]);
    a.avoid_buggy_ips = true;
    let mut asks = svc("default/z");
    asks.requested = vec![ip("10.0.0.255")];
    let p = run(
        vec![a],
        &[svc("default/a"), svc("default/b"), svc("default/c"), asks],
    );
    let mut got = [ips_of(&p, "default/a"), ips_of(&p, "default/b")].concat();
    got.sort();
    assert_eq!(got, ["10.0.0.254", "10.0.1.1"]);
    assert_eq!(reason_of(&p, "default/c"), "pool \"a\" is exhausted");
    assert!(reason_of(&p, "default/z").contains("avoidBuggyIPs"));
    assert_eq!(
        p.pools[0].available.ipv4, 0,
        "buggy addresses are not counted as available"
    );
}

#[test]
fn priority_then_name_orders_pools() {
    let mut low = pool("zz-first", &["10.2.0.0/24"]);
    low.priority = Some(1);
    let mut high = pool("aa-second", &["10.3.0.0/24"]);
    high.priority = Some(5);
    let unset = pool("0-last", &["10.1.0.0/24"]);
    let p = run(vec![unset, high, low], &[svc("default/a")]);
    assert_eq!(pools_of(&p, "default/a"), ["zz-first"]);
}

#[test]
fn namespace_lists_and_selectors_restrict_pools() {
    let mut team = pool("team", &["10.5.0.0/24"]);
    team.priority = Some(1);
    team.namespaces = vec!["shop".into()];
    team.namespace_selectors = vec![LabelSelector {
        match_labels: Some([("team".to_string(), "blue".to_string())].into()),
        ..Default::default()
    }];
    let namespaces: BTreeMap<String, Labels> = [(
        "blue-ns".to_string(),
        [("team".to_string(), "blue".to_string())].into(),
    )]
    .into();
    let p = plan(
        vec![team, pool("general", &["10.9.0.0/24"])],
        namespaces,
        &[svc("shop/a"), svc("blue-ns/b"), svc("other/c")],
        Start::Lowest,
    );
    assert_eq!(pools_of(&p, "blue-ns/b"), ["team"], "by namespace label");
    assert_eq!(pools_of(&p, "shop/a"), ["team"], "by namespace name");
    assert_eq!(pools_of(&p, "other/c"), ["general"]);
}

#[test]
fn service_selectors_restrict_pools() {
    let mut gold = pool("gold", &["10.5.0.0/24"]);
    gold.service_selectors = vec![LabelSelector {
        match_labels: Some([("tier".to_string(), "gold".to_string())].into()),
        ..Default::default()
    }];
    let mut vip = svc("default/vip");
    vip.labels = [("tier".to_string(), "gold".to_string())].into();
    let p = run(vec![gold], &[vip, svc("default/plain")]);
    assert_eq!(pools_of(&p, "default/vip"), ["gold"]);
    assert_eq!(
        reason_of(&p, "default/plain"),
        "no IPv4 pool is open to this Service: pool \"gold\" serves only Services matching spec.serviceAllocation.serviceSelectors"
    );
}

#[test]
fn sharing_needs_the_same_key_and_distinct_ports() {
    let a = shared(with_port(svc("default/a"), 80), "k");
    let b = shared(with_port(svc("default/b"), 443), "k");
    let c = shared(with_port(svc("default/c"), 80), "k");
    let d = shared(with_port(svc("default/d"), 8080), "other");
    let e = with_port(svc("default/e"), 9090);
    let p = run(vec![pool("a", &["10.0.0.0/24"])], &[a, b, c, d, e]);
    let a = ips_of(&p, "default/a");
    assert_eq!(ips_of(&p, "default/b"), a, "same key, other port: shares");
    let others: BTreeSet<Vec<String>> = ["c", "d", "e"]
        .iter()
        .map(|n| ips_of(&p, &format!("default/{n}")))
        .collect();
    assert_eq!(
        others.len(),
        3,
        "port 80 clash, another key, no key: each its own IP: {others:?}"
    );
    assert!(!others.contains(&a));
    assert_eq!(p.pools[0].assigned.ipv4, 4, "counts IPs, not Services");
}

#[test]
fn requested_shared_ip_with_clashing_ports_is_pending_with_the_reason() {
    let web = shared(with_port(svc("default/web"), 80), "k");
    let mut other = shared(with_port(svc("default/other"), 80), "k");
    other.requested = vec![ip("10.0.0.0")];
    let mut web = web;
    web.current = vec![ip("10.0.0.0")];
    let p = run(vec![pool("a", &["10.0.0.0/24"])], &[web, other]);
    assert_eq!(
        reason_of(&p, "default/other"),
        "requested 10.0.0.0: ports 80/TCP clash with default/web on shared key \"k\""
    );
}

#[test]
fn local_traffic_shares_only_with_the_same_selector() {
    let local = |name: &str, port: i32, app: &str| {
        let mut s = shared(with_port(svc(name), port), "k");
        s.traffic = Traffic::Local {
            selector: [("app".to_string(), app.to_string())].into(),
        };
        s
    };
    let p = run(
        vec![pool("a", &["10.0.0.0/24"])],
        &[
            local("default/a", 80, "web"),
            local("default/b", 443, "web"),
            local("default/c", 8443, "api"),
            shared(with_port(svc("default/d"), 22), "k"),
        ],
    );
    assert_eq!(ips_of(&p, "default/b"), ips_of(&p, "default/a"));
    assert_ne!(ips_of(&p, "default/c"), ips_of(&p, "default/a"));
    assert_ne!(ips_of(&p, "default/d"), ips_of(&p, "default/a"));
}

#[test]
fn dual_stack_policies() {
    let mut require = svc("default/require");
    require.family_policy = FamilyPolicy::RequireDualStack;
    require.families = vec![Family::V4, Family::V6];
    let mut prefer = svc("default/prefer");
    prefer.family_policy = FamilyPolicy::PreferDualStack;
    prefer.families = vec![Family::V4, Family::V6];
    let mut v6 = svc("default/v6");
    v6.families = vec![Family::V6];
    let only_v4 = run(
        vec![pool("v4", &["10.0.0.0/24"])],
        &[require.clone(), prefer.clone(), v6.clone()],
    );
    assert_eq!(
        reason_of(&only_v4, "default/require"),
        "RequireDualStack needs both families: no pool has IPv6 addresses"
    );
    assert_eq!(pools_of(&only_v4, "default/prefer"), ["v4"]);
    assert_eq!(
        reason_of(&only_v4, "default/v6"),
        "no pool has IPv6 addresses"
    );
    assert_eq!(
        only_v4.pools[0].assigned.ipv4, 1,
        "the failed RequireDualStack holds nothing"
    );

    let both = run(
        vec![pool("v4", &["10.0.0.0/24"]), pool("v6", &["fd00::/120"])],
        &[require, prefer, v6],
    );
    assert_eq!(pools_of(&both, "default/prefer"), ["v4", "v6"]);
    assert_eq!(pools_of(&both, "default/require"), ["v4", "v6"]);
    assert_eq!(pools_of(&both, "default/v6"), ["v6"]);
}

#[test]
fn hashed_start_removing_a_service_moves_no_other() {
    let services: Vec<ServiceRequest> = (0..50).map(|i| svc(&format!("default/s{i}"))).collect();
    let before = run_hashed(vec![pool("a", &["10.0.0.0/16"])], &services);
    let fewer: Vec<ServiceRequest> = services
        .iter()
        .filter(|s| s.key.name != "s17")
        .cloned()
        .collect();
    let after = run_hashed(vec![pool("a", &["10.0.0.0/16"])], &fewer);
    for s in &fewer {
        let key = s.key.to_string();
        assert_eq!(ips_of(&before, &key), ips_of(&after, &key), "{key} moved");
    }
}

#[test]
fn hashed_start_services_with_one_sharing_key_start_at_the_same_address() {
    let a = shared(with_port(svc("one/a"), 80), "k");
    let b = shared(with_port(svc("one/b"), 443), "k");
    let p = run_hashed(vec![pool("a", &["10.0.0.0/16"])], &[a, b]);
    assert_eq!(ips_of(&p, "one/a"), ips_of(&p, "one/b"));
}

fn open_to_all_namespaces(mut p: PoolConfig) -> PoolConfig {
    p.share_across_namespaces = true;
    p
}

#[test]
fn a_sharing_key_joins_another_namespace_only_where_the_pool_allows_it() {
    let mut tenant = shared(with_port(svc("tenant-a/web"), 80), "k");
    tenant.current = vec![ip("10.0.0.0")];
    let mut intruder = shared(with_port(svc("tenant-b/steal"), 443), "k");
    intruder.requested = vec![ip("10.0.0.0")];
    let closed = run(
        vec![pool("shared", &["10.0.0.0/24"])],
        &[tenant.clone(), intruder.clone()],
    );
    assert_eq!(ips_of(&closed, "tenant-a/web"), ["10.0.0.0"]);
    assert!(ips_of(&closed, "tenant-b/steal").is_empty());
    assert_eq!(
        reason_of(&closed, "tenant-b/steal"),
        "requested 10.0.0.0 is used by tenant-a/web, of another namespace; pool \"shared\" \
         lets Services of different namespaces share an IP only with \
         spec.allowSharingAcrossNamespaces: true"
    );
    // Without asking for the IP, the key does not pull it in either.
    intruder.requested.clear();
    let unasked = run(
        vec![pool("shared", &["10.0.0.0/24"])],
        &[tenant.clone(), intruder.clone()],
    );
    assert_ne!(
        ips_of(&unasked, "tenant-b/steal"),
        ips_of(&unasked, "tenant-a/web")
    );
    let open = run(
        vec![open_to_all_namespaces(pool("shared", &["10.0.0.0/24"]))],
        &[tenant, intruder],
    );
    assert_eq!(
        ips_of(&open, "tenant-b/steal"),
        ips_of(&open, "tenant-a/web")
    );
}

#[test]
fn services_of_two_namespaces_already_sharing_an_ip_keep_it() {
    let mut a = shared(with_port(svc("one/a"), 80), "k");
    let mut b = shared(with_port(svc("two/b"), 443), "k");
    a.current = vec![ip("10.0.0.7")];
    b.current = vec![ip("10.0.0.7")];
    let p = run(vec![pool("shared", &["10.0.0.0/24"])], &[a, b]);
    assert_eq!(ips_of(&p, "one/a"), ["10.0.0.7"]);
    assert_eq!(ips_of(&p, "two/b"), ["10.0.0.7"]);
}

#[test]
fn single_stack_takes_the_first_family() {
    let mut s = svc("default/a");
    s.families = vec![Family::V6, Family::V4];
    let p = run(
        vec![pool("v4", &["10.0.0.0/24"]), pool("v6", &["fd00::/120"])],
        &[s],
    );
    assert_eq!(pools_of(&p, "default/a"), ["v6"]);
}

#[test]
fn unusable_pool_keeps_existing_holders_but_hands_out_nothing() {
    let mut broken = pool("broken", &["10.0.0.0/24"]);
    broken.usable = false;
    broken.problem = Some("pool \"broken\": spec.addresses[1]: ...".into());
    let mut old = svc("default/old");
    old.current = vec![ip("10.0.0.5")];
    let p = run(vec![broken], &[old, svc("default/new")]);
    assert_eq!(ips_of(&p, "default/old"), ["10.0.0.5"]);
    assert!(reason_of(&p, "default/new").contains("pool \"broken\" is not usable"));
    assert_eq!(
        (p.pools[0].assigned.ipv4, p.pools[0].available.ipv4),
        (1, 0)
    );
}

#[test]
fn asking_for_a_broken_pool_says_so() {
    let broken = PoolConfig {
        name: "typo".into(),
        problem: Some("pool \"typo\": spec.addresses[0]: bad".into()),
        ..Default::default()
    };
    let mut s = svc("default/a");
    s.pool = Some("typo".into());
    let p = run(vec![broken, pool("ok", &["10.0.0.0/24"])], &[s]);
    assert_eq!(
        reason_of(&p, "default/a"),
        "no IPv4 pool is open to this Service: pool \"typo\" is not usable (pool \"typo\": spec.addresses[0]: bad)"
    );
}

#[test]
fn release_frees_the_ip_for_the_next_service() {
    let mut a = Allocator::new(
        vec![pool("a", &["10.0.0.1"])],
        BTreeMap::new(),
        Start::Lowest,
    );
    assert!(matches!(
        a.assign(&svc("default/one")),
        Outcome::Assigned { .. }
    ));
    assert!(matches!(
        a.assign(&svc("default/two")),
        Outcome::Pending { .. }
    ));
    a.release(&ServiceKey::new("default", "one"));
    assert_eq!(
        a.assign(&svc("default/two")).assignments()[0].ip,
        ip("10.0.0.1")
    );
    assert_eq!(a.usage()[0].available.ipv4, 0);
}

#[test]
fn reassigning_a_service_is_idempotent() {
    let mut a = Allocator::new(
        vec![pool("a", &["10.0.0.0/24"])],
        BTreeMap::new(),
        Start::Lowest,
    );
    let mut s = svc("default/one");
    let first = a.assign(&s);
    s.current = first.assignments().iter().map(|x| x.ip).collect();
    assert_eq!(a.assign(&s), first);
    assert_eq!(a.usage()[0].assigned.ipv4, 1);
}

#[test]
fn ipv6_counts_do_not_overflow() {
    let p = run(vec![pool("big", &["fd00::/8", "10.0.0.0/8"])], &[]);
    assert_eq!(p.pools[0].available.ipv6, 1u128 << 120);
    assert_eq!(p.pools[0].available.ipv4, 1 << 24);
}

/// Every IPv6 address, as a range (the CIDR ::/0 is refused as a whole family).
const ALL_V6: &str = "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff";

#[test]
fn the_whole_ipv6_space_is_a_pool_that_counts_and_hands_out_without_overflow() {
    let mut one = svc("default/a");
    one.families = vec![Family::V6];
    let p = run(vec![pool("all", &[ALL_V6])], &[one.clone()]);
    assert_eq!(ips_of(&p, "default/a"), ["::"]);
    assert_eq!(p.pools[0].available.ipv6, u128::MAX - 1);
    let hashed = run_hashed(vec![pool("all", &[ALL_V6])], &[one]);
    assert_eq!(ips_of(&hashed, "default/a").len(), 1);
}

// ---- lowest-free start (the cluster controller) ----

#[test]
fn lowest_start_gives_the_lowest_free_address_across_spans() {
    let mut a = pool("a", &["10.0.1.0-10.0.1.1", "10.0.0.255-10.0.0.255"]);
    a.avoid_buggy_ips = true;
    let p = run(
        vec![a],
        &[svc("default/a"), svc("default/b"), svc("default/c")],
    );
    // 10.0.0.255 and 10.0.1.0 are skipped under avoidBuggyIPs.
    assert_eq!(ips_of(&p, "default/a"), ["10.0.1.1"]);
    assert_eq!(reason_of(&p, "default/b"), "pool \"a\" is exhausted");
}

#[test]
fn lowest_start_fills_in_name_order_and_reuses_freed_addresses() {
    let p = run(
        vec![pool("a", &["10.0.0.0/24"])],
        &[svc("default/c"), svc("default/a"), svc("default/b")],
    );
    assert_eq!(ips_of(&p, "default/a"), ["10.0.0.0"]);
    assert_eq!(ips_of(&p, "default/b"), ["10.0.0.1"]);
    assert_eq!(ips_of(&p, "default/c"), ["10.0.0.2"]);

    let mut a = Allocator::new(
        vec![pool("a", &["10.0.0.0/24"])],
        BTreeMap::new(),
        Start::Lowest,
    );
    a.allocate_all(&with_status(&[svc("default/a"), svc("default/b")], &p));
    a.release(&ServiceKey::new("default", "a"));
    assert_eq!(
        a.assign(&svc("default/new")).assignments()[0].ip,
        ip("10.0.0.0")
    );
}

#[test]
fn lowest_start_still_joins_an_ip_shared_under_the_key() {
    let a = shared(with_port(svc("default/a"), 80), "k");
    let b = svc("default/b");
    let c = shared(with_port(svc("default/c"), 443), "k");
    let p = run(vec![pool("a", &["10.0.0.0/24"])], &[a, b, c]);
    assert_eq!(ips_of(&p, "default/a"), ["10.0.0.0"]);
    assert_eq!(ips_of(&p, "default/b"), ["10.0.0.1"]);
    assert_eq!(ips_of(&p, "default/c"), ["10.0.0.0"]);
}

#[test]
fn adopt_takes_status_ips_before_anything_is_allocated() {
    let mut a = Allocator::new(
        vec![pool("a", &["10.0.0.0/24"])],
        BTreeMap::new(),
        Start::Lowest,
    );
    let mut old = svc("default/z-old");
    old.current = vec![ip("10.0.0.0")];
    let adopted = a.adopt(&[old]);
    assert_eq!(
        adopted[&ServiceKey::new("default", "z-old")],
        [Assignment {
            ip: ip("10.0.0.0"),
            pool: "a".into()
        }]
    );
    assert_eq!(
        a.assign(&svc("default/a-new")).assignments()[0].ip,
        ip("10.0.0.1")
    );
}

// ---- issue 8: a sharer's edit moves only that sharer ----

/// Three Services sharing 10.0.0.0 as status says, `a` edited by `edit` (it sorts first).
fn sharers_after_editing_a(edit: impl Fn(ServiceRequest) -> ServiceRequest) -> Plan {
    let mut services = vec![
        shared(with_port(svc("default/a"), 80), "k"),
        shared(with_port(svc("default/b"), 443), "k"),
        shared(with_port(svc("default/c"), 8080), "k"),
    ];
    for s in &mut services {
        s.current = vec![ip("10.0.0.0")];
    }
    services[0] = edit(services[0].clone());
    run(vec![pool("a", &["10.0.0.0/24"])], &services)
}

#[test]
fn editing_one_sharers_key_moves_only_that_one() {
    let p = sharers_after_editing_a(|s| shared(s, "other"));
    assert_eq!(ips_of(&p, "default/b"), ["10.0.0.0"]);
    assert_eq!(ips_of(&p, "default/c"), ["10.0.0.0"]);
    assert_eq!(ips_of(&p, "default/a"), ["10.0.0.1"]);
}

#[test]
fn a_sharer_that_turns_local_or_clashes_moves_alone() {
    let local = sharers_after_editing_a(|mut s| {
        s.traffic = Traffic::Local {
            selector: [("app".to_string(), "web".to_string())].into(),
        };
        s
    });
    let clash = sharers_after_editing_a(|mut s| {
        s.ports = vec![
            PortKey {
                port: 443,
                protocol: "TCP".into(),
            },
            PortKey {
                port: 8080,
                protocol: "TCP".into(),
            },
        ];
        s
    });
    for p in [local, clash] {
        assert_eq!(ips_of(&p, "default/b"), ["10.0.0.0"]);
        assert_eq!(ips_of(&p, "default/c"), ["10.0.0.0"]);
        assert_eq!(ips_of(&p, "default/a"), ["10.0.0.1"]);
    }
}

#[test]
fn the_controller_moves_the_edited_sharer_even_in_a_tie() {
    // Two sharers: plan cannot tell which was edited, the controller sees the edit.
    let mut a = Allocator::new(
        vec![pool("a", &["10.0.0.0/24"])],
        BTreeMap::new(),
        Start::Lowest,
    );
    let mut x = shared(with_port(svc("default/a"), 80), "k");
    let mut y = shared(with_port(svc("default/b"), 443), "k");
    x.current = vec![ip("10.0.0.0")];
    y.current = vec![ip("10.0.0.0")];
    a.allocate_all(&[x.clone(), y]);
    let edited = a.assign(&shared(x, "other"));
    assert_eq!(edited.assignments()[0].ip, ip("10.0.0.1"));
    assert_eq!(
        a.assignments(&ServiceKey::new("default", "b"))[0].ip,
        ip("10.0.0.0")
    );
}

// ---- issue 8: families come from spec.ipFamilies ----

#[test]
fn prefer_dual_stack_on_a_single_stack_service_gets_one_family() {
    let mut s = svc("default/a");
    s.family_policy = FamilyPolicy::PreferDualStack;
    s.families = vec![Family::V4];
    let p = run(
        vec![pool("v4", &["10.0.0.0/24"]), pool("v6", &["fd00::/120"])],
        &[s],
    );
    assert_eq!(pools_of(&p, "default/a"), ["v4"]);
    assert!(
        matches!(&p.services[&ServiceKey::new("default", "a")], Outcome::Assigned { notes, .. } if notes.is_empty())
    );
}

#[test]
fn require_dual_stack_with_one_family_is_pending() {
    let mut s = svc("default/a");
    s.family_policy = FamilyPolicy::RequireDualStack;
    s.families = vec![Family::V6];
    let p = run(vec![pool("v6", &["fd00::/120"])], &[s]);
    assert_eq!(
        reason_of(&p, "default/a"),
        "RequireDualStack needs two families but spec.ipFamilies lists only IPv6"
    );
}

#[test]
fn dual_stack_asking_for_one_ip_gets_it_and_an_automatic_one_of_the_other_family() {
    for policy in [
        FamilyPolicy::RequireDualStack,
        FamilyPolicy::PreferDualStack,
    ] {
        let mut s = svc("default/a");
        s.family_policy = policy;
        s.families = vec![Family::V4, Family::V6];
        s.requested = vec![ip("10.0.0.7")];
        let p = run(
            vec![pool("v4", &["10.0.0.0/24"]), pool("v6", &["fd00::/120"])],
            &[s],
        );
        assert_eq!(
            ips_of(&p, "default/a"),
            ["10.0.0.7", "fd00::"],
            "{policy:?}"
        );
    }
}

// ---- issue 8: dedicated pools first ----

#[test]
fn a_pool_dedicated_to_the_service_comes_before_open_pools_of_equal_priority() {
    let mut team = pool("z-team", &["10.5.0.0/24"]);
    team.namespaces = vec!["shop".into()];
    let mut gold = pool("y-gold", &["10.6.0.0/24"]);
    gold.service_selectors = vec![LabelSelector {
        match_labels: Some([("tier".to_string(), "gold".to_string())].into()),
        ..Default::default()
    }];
    let mut vip = svc("other/vip");
    vip.labels = [("tier".to_string(), "gold".to_string())].into();
    let p = run(
        vec![pool("a-general", &["10.9.0.0/24"]), team, gold],
        &[svc("shop/a"), svc("other/b"), vip],
    );
    assert_eq!(pools_of(&p, "shop/a"), ["z-team"]);
    assert_eq!(pools_of(&p, "other/vip"), ["y-gold"]);
    assert_eq!(pools_of(&p, "other/b"), ["a-general"]);
}

#[test]
fn priority_still_comes_before_dedication() {
    let mut team = pool("team", &["10.5.0.0/24"]);
    team.namespaces = vec!["shop".into()];
    let mut general = pool("general", &["10.9.0.0/24"]);
    general.priority = Some(1);
    let p = run(vec![general, team], &[svc("shop/a")]);
    assert_eq!(pools_of(&p, "shop/a"), ["general"]);
}

// ---- when a pool changes under an assigned IP ----

#[test]
fn a_stranded_ip_stays_occupied() {
    let mut old = svc("default/old");
    old.current = vec![ip("10.0.0.0")];
    let mut shop = pool("a", &["10.0.0.0/24"]);
    shop.namespaces = vec!["shop".into()];
    let p = run(vec![shop], &[old, svc("shop/new")]);
    assert_eq!(ips_of(&p, "default/old"), ["10.0.0.0"]);
    assert_eq!(
        stranded_reason(&p, "default/old"),
        "10.0.0.0 is in pool \"a\", but pool \"a\" does not serve namespace \"default\" (spec.serviceAllocation); \
         the Service keeps it until it asks for another IP or pool, or is deleted"
    );
    assert_eq!(ips_of(&p, "shop/new"), ["10.0.0.1"]);
    assert_eq!(p.pools[0].assigned.ipv4, 2);
}

#[test]
fn a_stranded_ip_moves_when_the_service_asks_for_another_pool_or_ip() {
    let holding = || {
        let mut s = svc("default/a");
        s.current = vec![ip("192.168.1.1")];
        s
    };
    let mut names_pool = holding();
    names_pool.pool = Some("a".into());
    let mut asks_ip = holding();
    asks_ip.key.name = "b".into();
    asks_ip.requested = vec![ip("10.0.0.9")];
    let mut turns_v6 = holding();
    turns_v6.key.name = "c".into();
    turns_v6.families = vec![Family::V6];
    let p = run(
        vec![pool("a", &["10.0.0.0/24"]), pool("v6", &["fd00::/120"])],
        &[names_pool, asks_ip, turns_v6],
    );
    assert_eq!(ips_of(&p, "default/a"), ["10.0.0.0"]);
    assert_eq!(ips_of(&p, "default/b"), ["10.0.0.9"]);
    assert_eq!(ips_of(&p, "default/c"), ["fd00::"]);
}

#[test]
fn avoid_buggy_ips_turned_on_strands_a_dot_zero_holder() {
    let mut a = pool("a", &["10.0.0.0/24"]);
    a.avoid_buggy_ips = true;
    let mut s = svc("default/a");
    s.current = vec![ip("10.0.0.0")];
    let p = run(vec![a], &[s]);
    assert!(stranded_reason(&p, "default/a").starts_with("10.0.0.0 ends in .0 or .255"));
}

#[test]
fn a_held_requested_ip_in_a_broken_pool_is_kept() {
    let mut broken = pool("broken", &["10.0.0.0/24"]);
    broken.usable = false;
    broken.problem = Some("pool \"broken\": spec.addresses[1]: ...".into());
    let mut s = svc("default/a");
    s.requested = vec![ip("10.0.0.5")];
    s.current = vec![ip("10.0.0.5")];
    let p = run(vec![broken], &[s]);
    assert!(
        matches!(&p.services[&ServiceKey::new("default", "a")], Outcome::Assigned { assignments, .. } if assignments[0].ip == ip("10.0.0.5"))
    );
}

#[test]
fn a_holder_that_ends_pending_does_not_block_its_ip() {
    // RequireDualStack from a pool without IPv6: pending, so its old IPv4 is free for
    // the Service that asks for it, in the first answer already.
    let mut holder = svc("default/holder");
    holder.family_policy = FamilyPolicy::RequireDualStack;
    holder.families = vec![Family::V4, Family::V6];
    holder.pool = Some("v4".into());
    holder.current = vec![ip("10.0.0.6")];
    let mut asks = svc("default/asks");
    asks.requested = vec![ip("10.0.0.6")];
    let p = run(
        vec![pool("v4", &["10.0.0.0/24"]), pool("v6", &["fd00::/120"])],
        &[holder, asks],
    );
    assert_eq!(ips_of(&p, "default/asks"), ["10.0.0.6"]);
    assert_eq!(
        reason_of(&p, "default/holder"),
        "RequireDualStack needs both families: pool \"v4\" has no IPv6 addresses"
    );
}

// ---- properties ----

/// A small world: few addresses so that collisions are common; an IPv6 pool for
/// dual-stack Services; a manual pool; a pool dedicated to namespace ns1.
fn arb_services() -> impl Strategy<Value = Vec<ServiceRequest>> {
    let one = (
        (
            0usize..12,                  // name
            prop::option::of(0usize..2), // sharing key
            0i32..3,                     // port
            prop::option::of(0u8..12),   // requested host
        ),
        (
            prop::option::of(0u8..14),   // current IPv4 host (12 and 13 are in no pool)
            prop::option::of(0u8..6),    // current IPv6 host (4 and 5 are in no pool)
            prop::option::of(0usize..4), // pool annotation
            any::<bool>(),               // local traffic
            0usize..4,                   // families
            0usize..3,                   // family policy
        ),
    )
        .prop_map(
            |((name, key, port, req), (cur4, cur6, pool, local, families, policy))| {
                let mut s = with_port(svc(&format!("ns{}/svc{name}", name % 3)), 80 + port);
                s.sharing_key = key.map(|k| format!("key{k}"));
                s.requested = req
                    .map(|h| ip(&format!("10.0.0.{h}")))
                    .into_iter()
                    .collect();
                s.current = cur4
                    .map(|h| ip(&format!("10.0.0.{h}")))
                    .into_iter()
                    .chain(cur6.map(|h| ip(&format!("fd00::{h}"))))
                    .collect();
                s.pool = pool.map(|p| ["a", "b", "d", "missing"][p].to_string());
                if local {
                    s.traffic = Traffic::Local {
                        selector: [("app".to_string(), (name % 2).to_string())].into(),
                    };
                }
                s.families = [
                    vec![Family::V4],
                    vec![Family::V6],
                    vec![Family::V4, Family::V6],
                    vec![Family::V6, Family::V4],
                ][families]
                    .clone();
                s.family_policy = [
                    FamilyPolicy::SingleStack,
                    FamilyPolicy::PreferDualStack,
                    FamilyPolicy::RequireDualStack,
                ][policy];
                s
            },
        );
    prop::collection::vec(one, 0..24)
}

fn arb_start() -> impl Strategy<Value = Start> {
    prop_oneof![Just(Start::Lowest), Just(Start::Hashed)]
}

fn small_pools() -> Vec<PoolConfig> {
    let mut b = pool("b", &["10.0.0.6-10.0.0.9"]);
    b.auto_assign = false;
    let mut d = pool("d", &["10.0.0.10-10.0.0.11"]);
    d.namespaces = vec!["ns1".into()];
    vec![
        pool("a", &["10.0.0.0-10.0.0.5"]),
        b,
        pool("c", &["fd00::0-fd00::3"]),
        d,
    ]
}

fn dedup(services: Vec<ServiceRequest>) -> Vec<ServiceRequest> {
    let mut seen = BTreeSet::new();
    services
        .into_iter()
        .filter(|s| seen.insert(s.key.clone()))
        .collect()
}

/// The order in which [`plan`] decides Services.
/// Outcomes with the holder a note names left out: a note says who held an IP when the
/// Service was decided (the first holder by name), and a Service that joined the IP
/// later does not change a decision already made.
fn without_holders(outcomes: &BTreeMap<ServiceKey, Outcome>) -> BTreeMap<ServiceKey, Outcome> {
    let strip = |notes: &[String]| -> Vec<String> {
        notes
            .iter()
            .map(|n| match n.split_once(" is used by ") {
                Some((ip, rest)) => {
                    let after = rest.find([',', ';']).map_or("", |i| &rest[i..]);
                    format!("{ip} is used by …{after}")
                }
                None => n.clone(),
            })
            .collect()
    };
    outcomes
        .iter()
        .map(|(k, o)| {
            let o = match o.clone() {
                Outcome::Assigned { assignments, notes } => Outcome::Assigned {
                    assignments,
                    notes: strip(&notes),
                },
                Outcome::Stranded {
                    assignments,
                    reason,
                    notes,
                } => Outcome::Stranded {
                    assignments,
                    reason,
                    notes: strip(&notes),
                },
                pending => pending,
            };
            (k.clone(), o)
        })
        .collect()
}

fn plan_order(services: &[ServiceRequest]) -> Vec<ServiceRequest> {
    let mut order = services.to_vec();
    order.sort_by(|a, b| (a.requested.is_empty(), &a.key).cmp(&(b.requested.is_empty(), &b.key)));
    order
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn no_ip_is_held_by_services_that_may_not_share_it(services in arb_services(), start in arb_start()) {
        let services = dedup(services);
        let p = plan(small_pools(), BTreeMap::new(), &services, start);
        let by_key: BTreeMap<_, _> = services.iter().map(|s| (s.key.clone(), s)).collect();
        let mut holders: BTreeMap<IpAddr, Vec<&ServiceRequest>> = BTreeMap::new();
        for (key, outcome) in &p.services {
            for a in outcome.assignments() {
                holders.entry(a.ip).or_default().push(by_key[key]);
            }
        }
        for (ip, hs) in holders {
            for (i, x) in hs.iter().enumerate() {
                for y in &hs[i + 1..] {
                    prop_assert!(x.sharing_key.is_some() && x.sharing_key == y.sharing_key,
                        "{ip} held by {} and {} without a common key", x.key, y.key);
                    prop_assert!(x.ports.iter().all(|port| !y.ports.contains(port)),
                        "{ip}: {} and {} clash", x.key, y.key);
                    prop_assert_eq!(&x.traffic, &y.traffic);
                }
            }
        }
    }

    #[test]
    fn the_answer_does_not_depend_on_input_order(
        services in arb_services(),
        seed in any::<u64>(),
        start in arb_start(),
    ) {
        let services = dedup(services);
        let mut shuffled = services.clone();
        // A deterministic shuffle from the seed.
        let mut state = seed | 1;
        for i in (1..shuffled.len()).rev() {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17;
            shuffled.swap(i, (state % (i as u64 + 1)) as usize);
        }
        let mut pools = small_pools();
        pools.reverse();
        prop_assert_eq!(
            plan(small_pools(), BTreeMap::new(), &services, start),
            plan(pools, BTreeMap::new(), &shuffled, start)
        );
    }

    #[test]
    fn requested_ips_are_honoured_exactly_when_valid_and_free(
        hosts in prop::collection::vec(prop::option::of(0u8..16), 1..10),
    ) {
        // No sharing, no current IPs: a request is valid when it lies in pool "a" (.0-.9)
        // and no service earlier in name order asked for the same address.
        let services: Vec<ServiceRequest> = hosts.iter().enumerate().map(|(i, h)| {
            let mut s = svc(&format!("default/s{i:02}"));
            s.requested = h.map(|h| ip(&format!("10.0.0.{h}"))).into_iter().collect();
            s
        }).collect();
        let p = run(vec![pool("a", &["10.0.0.0-10.0.0.9"])], &services);
        let mut taken = BTreeSet::new();
        for s in &services {
            let Some(want) = s.requested.first() else { continue };
            let valid = to_u128(*want) & 0xff <= 9 && !taken.contains(want);
            let got = p.services[&s.key].assignments().iter().map(|a| a.ip).collect::<Vec<_>>();
            if valid {
                taken.insert(*want);
                prop_assert_eq!(got, vec![*want]);
            } else {
                prop_assert!(got.is_empty(), "{} got {:?} for an invalid request", s.key, got);
            }
        }
    }

    #[test]
    fn replanning_with_the_result_as_status_changes_nothing(services in arb_services(), start in arb_start()) {
        let services = dedup(services);
        let first = plan(small_pools(), BTreeMap::new(), &services, start);
        let second = plan(small_pools(), BTreeMap::new(), &with_status(&services, &first), start);
        for (key, outcome) in &first.services {
            if !outcome.assignments().is_empty() {
                prop_assert_eq!(outcome.assignments(), second.services[key].assignments(), "{} moved", key);
            }
        }
    }

    /// The controller's way: what exists is allocated at start, then new Services arrive
    /// one by one. In plan's order, that is what `plan` answers for all of them at once.
    #[test]
    fn one_service_at_a_time_answers_what_plan_answers(
        existing in arb_services(),
        arriving in arb_services(),
        start in arb_start(),
    ) {
        let existing = dedup(existing);
        let first = plan(small_pools(), BTreeMap::new(), &existing, start);
        // A pending Service is decided again whenever anything changes: it is arriving.
        let existing: Vec<ServiceRequest> = with_status(&existing, &first)
            .into_iter()
            .filter(|s| !s.current.is_empty())
            .collect();
        let arriving: Vec<ServiceRequest> = dedup(arriving)
            .into_iter()
            .filter(|s| existing.iter().all(|e| e.key != s.key))
            .map(|mut s| { s.current.clear(); s.key.name += "-new"; s })
            .collect();
        let all: Vec<ServiceRequest> = existing.iter().chain(&arriving).cloned().collect();
        let at_once = plan(small_pools(), BTreeMap::new(), &all, start);

        let mut controller = Allocator::new(small_pools(), BTreeMap::new(), start);
        let mut outcomes = controller.allocate_all(&existing);
        for s in plan_order(&arriving) {
            outcomes.insert(s.key.clone(), controller.assign(&s));
        }
        prop_assert_eq!(without_holders(&outcomes), without_holders(&at_once.services));
        prop_assert_eq!(controller.usage(), at_once.pools);
    }

    /// Removing a pool strands its Services' IPs but moves none of them, unless the
    /// Service names a pool or requests an IP.
    #[test]
    fn removing_a_pool_moves_no_service_that_did_not_ask(
        services in arb_services(),
        removed in 0usize..4,
        start in arb_start(),
    ) {
        let services = dedup(services);
        let first = plan(small_pools(), BTreeMap::new(), &services, start);
        let mut pools = small_pools();
        let gone = pools.remove(removed).name;
        let after = plan(pools, BTreeMap::new(), &with_status(&services, &first), start);
        for s in services.iter().filter(|s| s.pool.is_none() && s.requested.is_empty()) {
            let before = first.services[&s.key].assignments();
            let now = after.services[&s.key].assignments();
            let ips = |a: &[Assignment]| a.iter().map(|a| a.ip).collect::<Vec<_>>();
            prop_assert!(ips(before).iter().all(|ip| ips(now).contains(ip)),
                "{} moved from {:?} to {:?} when pool {} was removed", s.key, before, now, gone);
            let lost_pool = before.iter().any(|a| a.pool == gone);
            prop_assert!(!lost_pool || matches!(after.services[&s.key], Outcome::Stranded { .. }),
                "{}: {:?}", s.key, after.services[&s.key]);
        }
    }
}

#[test]
fn each_way_to_be_pending_has_its_kind_whatever_the_names() {
    let kind_of = |p: &Plan, key: &str| {
        let (ns, name) = key.split_once('/').unwrap();
        match &p.services[&ServiceKey::new(ns, name)] {
            Outcome::Pending { kind, .. } => *kind,
            other => panic!("{key} is not pending: {other:?}"),
        }
    };
    let mut requested = svc("default/requested");
    requested.requested = vec![ip("10.9.9.9")];
    // A name holding another kind's word does not change the kind.
    let mut named = svc("default/named");
    named.pool = Some("requested-exhausted".into());
    let mut v6 = svc("default/v6");
    v6.families = vec![Family::V6];
    let mut require = svc("default/require");
    require.family_policy = FamilyPolicy::RequireDualStack;
    let p = run(
        vec![pool("exhausted", &["10.0.0.10"])],
        &[
            svc("default/a"),
            svc("default/b"),
            requested,
            named,
            v6,
            require,
        ],
    );
    assert_eq!(kind_of(&p, "default/b"), Shortfall::Exhausted);
    assert_eq!(
        kind_of(&p, "default/requested"),
        Shortfall::RequestedUnavailable
    );
    assert_eq!(kind_of(&p, "default/named"), Shortfall::NoPool);
    assert_eq!(kind_of(&p, "default/v6"), Shortfall::NoPool);
    assert_eq!(kind_of(&p, "default/require"), Shortfall::DualStack);
    assert_eq!(
        [
            Shortfall::Exhausted,
            Shortfall::RequestedUnavailable,
            Shortfall::NoPool,
            Shortfall::DualStack,
            Shortfall::Other
        ]
        .map(Shortfall::label),
        [
            "exhausted",
            "requested_unavailable",
            "no_pool",
            "dual_stack",
            "other"
        ]
    );
}
