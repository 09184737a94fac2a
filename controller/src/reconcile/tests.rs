use std::collections::BTreeMap;

use ferrolb_api::{AddressEntry, IPAddressPool, IPAddressPoolSpec};
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Namespace, Service, ServicePort, ServiceSpec,
    ServiceStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::*;

fn pool(name: &str, addresses: &[&str], generation: i64) -> IPAddressPool {
    let mut p = IPAddressPool::new(
        name,
        IPAddressPoolSpec {
            addresses: addresses.iter().map(|a| AddressEntry::from(*a)).collect(),
            auto_assign: Some(true),
            ..Default::default()
        },
    );
    p.metadata.generation = Some(generation);
    p
}

fn service(name: &str, status: &[&str]) -> Service {
    Service {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ip_families: Some(vec!["IPv4".into()]),
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(
                    status
                        .iter()
                        .map(|ip| LoadBalancerIngress {
                            ip: Some(ip.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        }),
    }
}

fn annotated(mut svc: Service, key: &str, value: &str) -> Service {
    svc.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(key.into(), value.into());
    svc
}

fn key(name: &str) -> ServiceKey {
    ServiceKey::new("shop", name)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn statuses(actions: &[Action]) -> Vec<(String, Vec<IpAddr>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ServiceStatus { key, ips, .. } => Some((key.name.clone(), ips.clone())),
            _ => None,
        })
        .collect()
}

fn events(actions: &[Action]) -> Vec<(String, &'static str, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Event(e) => Some((e.key.name.clone(), e.reason, e.message.clone())),
            _ => None,
        })
        .collect()
}

/// What the API server would answer to the status writes among `actions`.
fn written(r: &mut Reconciler, objects: &mut BTreeMap<String, Service>, actions: &[Action]) {
    for (name, ips) in statuses(actions) {
        let svc = objects.get_mut(&name).unwrap();
        let texts: Vec<String> = ips.iter().map(|i| i.to_string()).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut updated = service(&name, &refs);
        updated.metadata = svc.metadata.clone();
        updated.spec = svc.spec.clone();
        let rv: u64 = svc
            .metadata
            .resource_version
            .as_ref()
            .unwrap()
            .parse()
            .unwrap();
        updated.metadata.resource_version = Some((rv + 1).to_string());
        r.service_written(&updated);
        *svc = updated;
    }
}

fn started(pools: &[IPAddressPool], services: &[Service]) -> (Reconciler, Vec<Action>) {
    let mut r = Reconciler::new("ferrolb.io/lb");
    let actions = r.start(pools, &[Namespace::default()], services);
    (r, actions)
}

#[test]
fn start_adopts_status_and_gives_new_services_the_lowest_free_address() {
    let pools = [pool("lab", &["192.0.2.10-192.0.2.19"], 1)];
    let (_, actions) = started(
        &pools,
        &[
            service("a", &["192.0.2.10"]),
            service("b", &[]),
            service("c", &["192.0.2.12"]),
        ],
    );
    assert_eq!(
        statuses(&actions),
        vec![("b".into(), vec![ip("192.0.2.11")])]
    );
    let events = events(&actions);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].1, IP_ALLOCATED);
    assert_eq!(events[0].2, "Assigned 192.0.2.11 from pool lab");
}

#[test]
fn a_pending_service_gets_one_event_however_often_it_changes() {
    let pools = [pool("lab", &["192.0.2.10"], 1)];
    let (mut r, actions) = started(&pools, &[service("a", &["192.0.2.10"]), service("b", &[])]);
    assert_eq!(statuses(&actions), vec![]);
    let e = events(&actions);
    assert_eq!(e.len(), 1);
    assert_eq!((e[0].0.as_str(), e[0].1), ("b", ALLOCATION_FAILED));
    assert!(e[0].2.contains("exhausted"), "{}", e[0].2);
    for i in 0..3 {
        let mut b = service("b", &[]);
        b.metadata.labels = Some([("round".to_string(), i.to_string())].into());
        assert_eq!(r.service_applied(&b), vec![]);
    }
}

#[test]
fn a_deleted_service_frees_its_address_for_a_pending_one() {
    let pools = [pool("lab", &["192.0.2.10"], 1)];
    let (mut r, _) = started(&pools, &[service("a", &["192.0.2.10"]), service("b", &[])]);
    let actions = r.service_deleted(&key("a"));
    assert_eq!(
        statuses(&actions),
        vec![("b".into(), vec![ip("192.0.2.10")])]
    );
    assert_eq!(events(&actions)[0].1, IP_ALLOCATED);
}

#[test]
fn the_echo_of_a_write_writes_nothing() {
    let pools = [pool("lab", &["192.0.2.10-192.0.2.19"], 1)];
    let mut objects: BTreeMap<String, Service> = BTreeMap::new();
    let (mut r, _) = started(&pools, &[]);
    objects.insert("a".into(), service("a", &[]));
    let actions = r.service_applied(&objects["a"]);
    assert_eq!(
        statuses(&actions),
        vec![("a".into(), vec![ip("192.0.2.10")])]
    );
    written(&mut r, &mut objects, &actions);
    // The watch delivers the written object, then a later unrelated edit.
    assert_eq!(r.service_applied(&objects["a"]), vec![]);
    let mut edited = objects["a"].clone();
    edited.metadata.labels = Some([("tier".to_string(), "web".to_string())].into());
    assert_eq!(r.service_applied(&edited), vec![]);
}

#[test]
fn a_write_that_lags_behind_the_watch_is_not_repeated() {
    // The controller's memory is ahead of the watch: an event carrying the old status
    // must not move the Service or write again.
    let pools = [pool("lab", &["192.0.2.10-192.0.2.19"], 1)];
    let (mut r, _) = started(&pools, &[]);
    let first = r.service_applied(&service("a", &[]));
    assert_eq!(statuses(&first).len(), 1);
    let mut stale = service("a", &[]);
    stale.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
    let again = r.service_applied(&stale);
    // Status still differs from the stale object, so the same IP is written again, and
    // no second Event is sent.
    assert_eq!(statuses(&again), vec![("a".into(), vec![ip("192.0.2.10")])]);
    assert_eq!(events(&again), vec![]);
}

#[test]
fn a_deleted_pool_strands_its_addresses_in_place_with_one_warning() {
    let pools = [pool("lab", &["192.0.2.10-192.0.2.19"], 1)];
    let (mut r, _) = started(&pools, &[service("a", &["192.0.2.10"])]);
    let actions = r.pools_applied(&[]);
    assert_eq!(statuses(&actions), vec![]);
    let e = events(&actions);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].1, IP_STRANDED);
    assert!(e[0].2.contains("192.0.2.10"), "{}", e[0].2);
    assert_eq!(r.pools_applied(&[]), vec![]);
    // A new pool with the same addresses does not hand the stranded IP to anyone else.
    let actions = r.pools_applied(&[pool("lab2", &["192.0.2.10-192.0.2.11"], 1)]);
    let actions2 = r.service_applied(&service("b", &[]));
    assert_eq!(
        statuses(&actions2),
        vec![("b".into(), vec![ip("192.0.2.11")])]
    );
    assert!(events(&actions).iter().all(|e| e.1 != IP_STRANDED));
}

#[test]
fn a_shrunk_pool_says_which_addresses_it_strands() {
    let pools = [pool("lab", &["192.0.2.10-192.0.2.19"], 1)];
    let (mut r, _) = started(&pools, &[service("a", &["192.0.2.15"])]);
    r.pools_applied(&[pool("lab", &["192.0.2.10-192.0.2.12"], 2)]);
    let now = Time(Timestamp::now());
    let actions = r.pool_statuses(&now, &BTreeMap::new());
    let Some(Action::PoolStatus { status, .. }) = actions.first() else {
        panic!("{actions:?}");
    };
    let stranded = status
        .conditions
        .iter()
        .find(|c| c.type_ == STRANDED)
        .expect("a Stranded condition");
    assert!(
        stranded.message.contains("192.0.2.15 (shop/a)"),
        "{}",
        stranded.message
    );
    // The stranded address is no longer the pool's to count.
    assert_eq!((status.assigned_ipv4, status.available_ipv4), (0, 3));
}

/// Issue 23, item 1: an IP the pool gave out that another host answers for (a node's
/// record says it holds it back) is named on the pool, with who answers; it goes when
/// the host lets go.
#[test]
fn a_pool_names_the_addresses_another_host_answers_for() {
    let pools = [pool("lab", &["192.0.2.10-192.0.2.19"], 1)];
    let (mut r, _) = started(
        &pools,
        &[service("a", &["192.0.2.10"]), service("b", &["192.0.2.11"])],
    );
    let now = Time(Timestamp::now());
    let taken = BTreeMap::from([
        (
            ip("192.0.2.11"),
            "MAC 02:42:ac:12:00:0b (node node-c)".to_string(),
        ),
        // Not one the controller gave out: a record cannot put it on the pool.
        (ip("192.0.2.19"), "MAC 02:42:ac:12:00:0c".to_string()),
    ]);
    let actions = r.pool_statuses(&now, &taken);
    let [Action::PoolStatus { name, status }] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == TAKEN)
        .expect("an AddressesTaken condition");
    assert_eq!(
        (
            condition.status.as_str(),
            condition.reason.as_str(),
            condition.message.as_str()
        ),
        (
            "True",
            "AnsweredByAnotherHost",
            "1 address is answered by another host on the network, so ferrolb does not announce it: \
             192.0.2.11 (shop/b) by MAC 02:42:ac:12:00:0b (node node-c)"
        )
    );
    r.pool_written(name, status.clone());
    let actions = r.pool_statuses(&now, &BTreeMap::new());
    let [Action::PoolStatus { status, .. }] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    assert!(
        status.conditions.iter().all(|c| c.type_ != TAKEN),
        "{status:?}"
    );
}

#[test]
fn pool_status_is_written_only_when_it_changes() {
    let pools = [pool("lab", &["192.0.2.10-192.0.2.19"], 1)];
    let (mut r, _) = started(&pools, &[service("a", &["192.0.2.10"])]);
    let now = Time(Timestamp::now());
    let actions = r.pool_statuses(&now, &BTreeMap::new());
    let [Action::PoolStatus { name, status }] = actions.as_slice() else {
        panic!("{actions:?}");
    };
    assert_eq!((status.assigned_ipv4, status.available_ipv4), (1, 9));
    assert_eq!(status.assigned_ipv6, "0");
    let ready = &status.conditions[0];
    assert_eq!(
        (ready.type_.as_str(), ready.status.as_str()),
        (READY, "True")
    );
    r.pool_written(name, status.clone());
    let later = Time(Timestamp::now());
    assert_eq!(r.pool_statuses(&later, &BTreeMap::new()), vec![]);
    // A status-only update of the pool (same generation) decides nothing again.
    let mut echoed = pools[0].clone();
    echoed.status = Some(status.clone());
    assert_eq!(r.pools_applied(&[echoed]), vec![]);
}

#[test]
fn another_class_is_released_and_never_written() {
    let pools = [pool("lab", &["192.0.2.10-192.0.2.19"], 1)];
    let (mut r, _) = started(&pools, &[service("a", &["192.0.2.10"])]);
    let mut other = service("a", &["192.0.2.10"]);
    other.spec.as_mut().unwrap().load_balancer_class = Some("example.com/other".into());
    let actions = r.service_applied(&other);
    assert_eq!(statuses(&actions), vec![]);
    assert_eq!(events(&actions)[0].1, IP_RELEASED);
    // Its address is free again.
    let actions = r.service_applied(&service("b", &[]));
    assert_eq!(
        statuses(&actions),
        vec![("b".into(), vec![ip("192.0.2.10")])]
    );
    // And a Service born with another class is never touched.
    let mut foreign = service("c", &[]);
    foreign.spec.as_mut().unwrap().load_balancer_class = Some("example.com/other".into());
    assert_eq!(r.service_applied(&foreign), vec![]);
}

#[test]
fn an_invalid_edit_keeps_the_address_and_warns_once() {
    let pools = [pool("lab", &["192.0.2.10"], 1)];
    let (mut r, _) = started(&pools, &[service("a", &["192.0.2.10"])]);
    let bad = annotated(
        service("a", &["192.0.2.10"]),
        "ferrolb.io/loadBalancerIPs",
        "192.0.2.300",
    );
    let actions = r.service_applied(&bad);
    assert_eq!(statuses(&actions), vec![]);
    let e = events(&actions);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].1, INVALID_SERVICE);
    assert!(e[0].2.contains("keeping 192.0.2.10"), "{}", e[0].2);
    assert_eq!(r.service_applied(&bad), vec![]);
    // Nobody else gets the address meanwhile.
    let actions = r.service_applied(&service("b", &[]));
    assert_eq!(statuses(&actions), vec![]);
    assert_eq!(events(&actions)[0].1, ALLOCATION_FAILED);
    // Fixed: nothing moves, and no Event says it was assigned anew.
    let actions = r.service_applied(&service("a", &["192.0.2.10"]));
    assert_eq!(statuses(&actions), vec![]);
}

#[test]
fn an_invalid_new_service_stays_pending_with_the_reason() {
    let pools = [pool("lab", &["192.0.2.10"], 1)];
    let (mut r, _) = started(&pools, &[]);
    let bad = annotated(service("a", &[]), "ferrolb.io/loadBalancerIPs", "banana");
    let actions = r.service_applied(&bad);
    let e = events(&actions);
    assert_eq!(e[0].1, ALLOCATION_FAILED);
    assert!(
        e[0].2.contains("\"banana\" is not an IP address"),
        "{}",
        e[0].2
    );
    assert_eq!(statuses(&actions), vec![]);
}

#[test]
fn nothing_is_decided_before_start() {
    let mut r = Reconciler::new("ferrolb.io/lb");
    assert_eq!(r.service_applied(&service("a", &[])), vec![]);
    assert_eq!(r.pools_applied(&[pool("lab", &["192.0.2.10"], 1)]), vec![]);
    assert_eq!(
        r.pool_statuses(&Time(Timestamp::now()), &BTreeMap::new()),
        vec![]
    );
}

#[test]
fn a_restart_moves_nothing_even_with_pending_services() {
    // Status written by a previous run; the pool is full and more Services wait.
    let pools = [pool("lab", &["192.0.2.10-192.0.2.12"], 1)];
    let mut services = vec![
        service("z", &["192.0.2.10"]),
        service("y", &["192.0.2.11"]),
        service("x", &["192.0.2.12"]),
    ];
    services.extend((0..5).map(|i| service(&format!("p{i}"), &[])));
    let (_, actions) = started(&pools, &services);
    assert_eq!(statuses(&actions), vec![]);
    assert_eq!(
        events(&actions)
            .iter()
            .filter(|e| e.1 == ALLOCATION_FAILED)
            .count(),
        5
    );
}

#[test]
fn a_from_node_network_pool_serves_once_its_speakers_resolved_it() {
    let mut auto = pool("auto", &[], 1);
    auto.spec.from_node_network = Some(ferrolb_api::FromNodeNetwork {
        size: 4,
        families: vec![],
    });
    let (mut r, actions) = started(std::slice::from_ref(&auto), &[service("a", &[])]);
    assert_eq!(statuses(&actions), vec![], "nothing to give yet");
    let now = Time(Timestamp::now());
    let written = r.pool_statuses(&now, &BTreeMap::new());
    let [Action::PoolStatus { status, .. }] = written.as_slice() else {
        panic!("one pool status: {written:?}");
    };
    let status = status.clone();
    let ready = &status.conditions[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", UNRESOLVED)
    );
    assert!(
        ready
            .message
            .contains("spec.fromNodeNetwork is not resolved yet"),
        "{}",
        ready.message
    );
    r.pool_written("auto", status.clone());
    // A speaker writes status.nodeNetwork (same generation): the pending Service gets
    // the lowest resolved address, and the pool turns Ready.
    let mut resolved = auto.clone();
    resolved.status = Some(IPAddressPoolStatus {
        node_network: Some(ferrolb_api::NodeNetworkStatus {
            addresses: vec!["10.99.0.251-10.99.0.254".into()],
            resolved_by: "node1".into(),
            ..Default::default()
        }),
        ..status
    });
    let actions = r.pools_applied(&[resolved]);
    assert_eq!(
        statuses(&actions),
        vec![("a".into(), vec![ip("10.99.0.251")])]
    );
    let written = r.pool_statuses(&now, &BTreeMap::new());
    let [Action::PoolStatus { status, .. }] = written.as_slice() else {
        panic!("one pool status: {written:?}");
    };
    let status = status.clone();
    assert_eq!(status.conditions[0].status, "True");
    assert_eq!(
        status.conditions[0].message,
        "every entry of status.nodeNetwork.addresses is valid and overlaps no other pool"
    );
    assert_eq!(
        status.node_network.as_ref().unwrap().resolved_by,
        "node1",
        "the speakers' part is kept"
    );
}

/// Issue 22, item 3: another controller that rewrites the IPs ferrolb wrote is told of
/// once, by its field manager, and not fought; a change of the Service tries again.
#[test]
fn another_writer_of_the_ips_is_reported_once_and_not_fought() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    let (mut r, actions) = started(&[pool("p", &["192.0.2.0/29"], 1)], &[service("web", &[])]);
    let mut objects = BTreeMap::from([("web".to_string(), service("web", &[]))]);
    assert_eq!(
        statuses(&actions),
        vec![("web".into(), vec![ip("192.0.2.0")])]
    );
    written(&mut r, &mut objects, &actions);
    // Our own write coming back through the watch is no conflict.
    assert_eq!(r.service_applied(&objects["web"]), vec![]);

    let rival = |ips: &[&str], rv: u64| {
        let mut svc = service("web", ips);
        svc.metadata.resource_version = Some(rv.to_string());
        svc.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some("metallb-controller".into()),
            subresource: Some("status".into()),
            ..Default::default()
        }]);
        svc
    };
    let mut told = Vec::new();
    for (ips, rv) in [
        (&[][..], 10),
        (&["10.9.9.9"][..], 11),
        (&[][..], 12),
        (&["192.0.2.5"][..], 13),
    ] {
        let actions = r.service_applied(&rival(ips, rv));
        assert_eq!(statuses(&actions), vec![], "not fought at {rv}");
        told.extend(events(&actions));
    }
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].1, STATUS_CONFLICT);
    assert_eq!(
        told[0].2,
        "status.loadBalancer.ingress was changed to nothing by \"metallb-controller\" after \
         ferrolb wrote 192.0.2.0: another controller serves this Service too. ferrolb writes \
         its status no more until the Service changes; give one of the two controllers a \
         spec.loadBalancerClass, or remove the other"
    );
    // What the other writer holds is held: no other Service gets it.
    let (_, actions) = (
        (),
        r.service_applied(&{
            let mut other = service("api", &[]);
            other.metadata.resource_version = Some("20".into());
            other
        }),
    );
    assert_eq!(
        statuses(&actions),
        vec![("api".into(), vec![ip("192.0.2.0")])]
    );

    // The Service changes (the user asks for an IP): ferrolb decides and writes again.
    let changed = annotated(
        rival(&["192.0.2.5"], 21),
        "ferrolb.io/loadBalancerIPs",
        "192.0.2.3",
    );
    let actions = r.service_applied(&changed);
    assert_eq!(
        statuses(&actions),
        vec![("web".into(), vec![ip("192.0.2.3")])]
    );
}

/// A later write by ferrolb itself under another name (a second ferrolb installation
/// serving the same Services) is named as such.
#[test]
fn a_second_ferrolb_is_named_as_one() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
    let (mut r, actions) = started(&[pool("p", &["192.0.2.0/29"], 1)], &[service("web", &[])]);
    let mut objects = BTreeMap::from([("web".to_string(), service("web", &[]))]);
    written(&mut r, &mut objects, &actions);
    let mut other = service("web", &["192.0.2.7"]);
    other.metadata.resource_version = Some("30".into());
    other.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
        manager: Some(FIELD_MANAGER.into()),
        subresource: Some("status".into()),
        ..Default::default()
    }]);
    let told = events(&r.service_applied(&other));
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0]
            .2
            .contains("by another ferrolb controller (field manager ferrolb-controller)"),
        "{}",
        told[0].2
    );
}
