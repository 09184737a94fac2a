//! `ferrolb controller` against a real API server, running as the Helm chart's
//! ServiceAccount: assignment, Events, pool status, restarts, leader changes, releases,
//! conflicts and outages.

mod cluster;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use cluster::{Cluster, NAMESPACE, eventually, eventually_or, load_balancer, pool};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};

const DEADLINE: Duration = Duration::from_secs(15);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn ips_of(cluster: &Cluster, name: &str) -> Vec<IpAddr> {
    cluster
        .ips("default")
        .await
        .remove(name)
        .unwrap_or_default()
}

async fn wait_ips(cluster: &Cluster, name: &str) -> Vec<IpAddr> {
    eventually(DEADLINE, &format!("an IP for {name}"), || async {
        Some(ips_of(cluster, name).await).filter(|ips| !ips.is_empty())
    })
    .await
}

async fn services(cluster: &Cluster) -> Api<Service> {
    Api::namespaced(cluster.client().await, "default")
}

#[tokio::test]
async fn a_service_gets_the_first_address_with_an_event_and_pool_counts() {
    let cluster = Cluster::start().await;
    let controller = cluster.controller("a", &[]).await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.20"]));
    // The Service comes once the controller has the pool: its watches are separate, and
    // a Service it saw first would be pending for a moment (an AllocationFailed Event).
    eventually(
        DEADLINE,
        "the controller to mark the pool Ready",
        || async {
            let ready = cluster.kubectl(&[
                "get",
                "ippool",
                "lab",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            (ready == "True").then_some(())
        },
    )
    .await;
    let started = Instant::now();
    cluster.apply(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec: {type: LoadBalancer, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}\n",
    );
    let ips = wait_ips(&cluster, "web").await;
    eprintln!("EXTERNAL-IP after {:?}", started.elapsed());
    assert_eq!(ips, vec![ip("198.51.100.10")]);

    let table = cluster.kubectl(&["get", "svc", "web"]);
    assert!(table.contains("198.51.100.10"), "{table}");
    let mode = cluster.kubectl(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.status.loadBalancer.ingress[0].ipMode}",
    ]);
    assert_eq!(mode, "VIP");

    eventually(DEADLINE, "the IPAllocated event", || async {
        let described = cluster.kubectl(&["describe", "svc", "web"]);
        described
            .contains("Assigned 198.51.100.10 from pool lab")
            .then_some(())
    })
    .await;
    assert_eq!(cluster.event_reasons("default", "web"), vec!["IPAllocated"]);

    let counts = eventually(DEADLINE, "pool counts", || async {
        let out = cluster.kubectl(&[
            "get",
            "ippool",
            "lab",
            "-o",
            "jsonpath={.status.assignedIPv4}/{.status.availableIPv4}/{.status.conditions[?(@.type==\"Ready\")].status}",
        ]);
        (out == "1/10/True").then_some(out)
    })
    .await;
    assert_eq!(counts, "1/10/True");

    // The same counts on /metrics, under ferrolb's names and MetalLB's.
    let series = [
        "ferrolb_controller_addresses_in_use{pool=\"lab\",family=\"IPv4\"}",
        "ferrolb_controller_addresses_capacity{pool=\"lab\",family=\"IPv4\"}",
        "metallb_allocator_addresses_in_use_total{pool=\"lab\"}",
        "metallb_allocator_addresses_total{pool=\"lab\"}",
    ];
    let values = eventually(DEADLINE, "pool counts on /metrics", || async {
        let values: Vec<Option<f64>> = series.iter().map(|s| controller.metric(s)).collect();
        (values == [Some(1.0), Some(11.0), Some(1.0), Some(11.0)]).then_some(values)
    })
    .await;
    assert_eq!(values, [Some(1.0), Some(11.0), Some(1.0), Some(11.0)]);
}

#[tokio::test]
async fn a_pending_service_says_why_once() {
    let cluster = Cluster::start().await;
    let controller = cluster.controller("a", &[]).await;
    cluster.apply(&pool("tiny", &["198.51.100.10"]));
    let api = services(&cluster).await;
    api.create(&PostParams::default(), &load_balancer("first", &[]))
        .await
        .unwrap();
    wait_ips(&cluster, "first").await;
    api.create(&PostParams::default(), &load_balancer("second", &[]))
        .await
        .unwrap();
    eventually(DEADLINE, "AllocationFailed", || async {
        let described = cluster.kubectl(&["describe", "svc", "second"]);
        described.contains("AllocationFailed").then_some(described)
    })
    .await;
    let described = cluster.kubectl(&["describe", "svc", "second"]);
    assert!(
        described.contains("pool \"tiny\" is exhausted"),
        "{described}"
    );
    // Edits that change nothing for allocation produce no further Events.
    for i in 0..5 {
        api.patch(
            "second",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"round": i.to_string()}}})),
        )
        .await
        .unwrap();
    }
    // The deletion of `first` is processed after the edits, so once `second` has the
    // address every edit has been seen.
    api.delete("first", &DeleteParams::default()).await.unwrap();
    assert_eq!(
        wait_ips(&cluster, "second").await,
        vec![ip("198.51.100.10")]
    );
    eventually(DEADLINE, "the IPAllocated event", || async {
        let reasons = cluster.event_reasons("default", "second");
        (reasons.len() == 2).then_some(())
    })
    .await;
    assert_eq!(
        cluster.event_reasons("default", "second"),
        vec!["AllocationFailed", "IPAllocated"]
    );
    assert_eq!(
        controller.metric("ferrolb_controller_allocation_failures_total{reason=\"exhausted\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn deletion_and_type_changes_free_addresses_and_other_classes_are_never_touched() {
    let cluster = Cluster::start().await;
    let _controller = cluster.controller("a", &[]).await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.11"]));
    let api = services(&cluster).await;
    for name in ["one", "two"] {
        api.create(&PostParams::default(), &load_balancer(name, &[]))
            .await
            .unwrap();
        wait_ips(&cluster, name).await;
    }
    let mut foreign = load_balancer("foreign", &[]);
    foreign.spec.as_mut().unwrap().load_balancer_class = Some("example.com/other".into());
    api.create(&PostParams::default(), &foreign).await.unwrap();

    // Deleted: its address goes to the next Service.
    let freed = ips_of(&cluster, "one").await;
    api.delete("one", &DeleteParams::default()).await.unwrap();
    api.create(&PostParams::default(), &load_balancer("three", &[]))
        .await
        .unwrap();
    assert_eq!(wait_ips(&cluster, "three").await, freed);

    // No longer a LoadBalancer: released, and the address serves the next one.
    let freed = ips_of(&cluster, "two").await;
    api.patch(
        "two",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"type": "ClusterIP"}})),
    )
    .await
    .unwrap();
    api.create(&PostParams::default(), &load_balancer("four", &[]))
        .await
        .unwrap();
    assert_eq!(wait_ips(&cluster, "four").await, freed);
    assert_eq!(ips_of(&cluster, "two").await, Vec::<IpAddr>::new());

    // The other class's Service: no status, no Event, no field of ours.
    let foreign = api.get("foreign").await.unwrap();
    assert!(ferrolb_allocator::input::ingress_ips(&foreign).is_empty());
    let managers: Vec<String> = foreign
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        !managers.iter().any(|m| m.contains("ferrolb")),
        "{managers:?}"
    );
    assert_eq!(
        cluster.event_reasons("default", "foreign"),
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn a_restart_with_200_assigned_and_some_pending_moves_nothing() {
    let cluster = Cluster::start().await;
    let mut first = cluster.controller("first", &[]).await;
    // 200 addresses, 230 Services: 30 stay pending.
    cluster.apply(&pool("lab", &["198.51.100.0-198.51.100.199"]));
    cluster.create_services("default", "svc", 230).await;
    let before = eventually(Duration::from_secs(60), "200 assigned", || async {
        let ips = cluster.ips("default").await;
        let assigned = ips.values().filter(|v| !v.is_empty()).count();
        (assigned == 200).then_some(ips)
    })
    .await;
    first.kill();

    let second = cluster.controller("second", &[]).await;
    second.wait_ready().await;
    // Free one address: the first pending Service (by name) takes it once the new
    // controller is active, which shows it has run its start.
    let api = services(&cluster).await;
    let freed_name = before
        .iter()
        .find(|(_, v)| !v.is_empty())
        .unwrap()
        .0
        .clone();
    api.delete(&freed_name, &DeleteParams::default())
        .await
        .unwrap();
    let after = eventually(
        Duration::from_secs(30),
        "the freed address reassigned",
        || async {
            let ips = cluster.ips("default").await;
            let assigned = ips.values().filter(|v| !v.is_empty()).count();
            (assigned == 200).then_some(ips)
        },
    )
    .await;
    let moved: Vec<&String> = before
        .iter()
        .filter(|(name, ips)| !ips.is_empty() && after.get(*name).is_some_and(|a| a != *ips))
        .map(|(name, _)| name)
        .collect();
    assert!(moved.is_empty(), "moved: {moved:?}");
    let taken_by: Vec<&String> = after
        .iter()
        .filter(|(name, ips)| !ips.is_empty() && before.get(*name).is_some_and(|b| b.is_empty()))
        .map(|(name, _)| name)
        .collect();
    assert_eq!(taken_by.len(), 1, "{taken_by:?}");
    assert_eq!(after[taken_by[0]], before[&freed_name]);
}

#[tokio::test]
async fn the_standby_takes_over_when_the_leader_dies() {
    let cluster = Cluster::start().await;
    let mut a = cluster.controller("a", &[]).await;
    let mut b = cluster.controller("b", &[]).await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.30"]));
    cluster.create_services("default", "before", 10).await;
    let before = eventually(DEADLINE, "10 assigned", || async {
        let ips = cluster.ips("default").await;
        (ips.values().filter(|v| !v.is_empty()).count() == 10).then_some(ips)
    })
    .await;
    let holder = || {
        cluster.kubectl(&[
            "get",
            "lease",
            "-n",
            NAMESPACE,
            "ferrolb-controller",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    };
    let leader = holder();
    assert!(leader == "a" || leader == "b", "{leader}");
    let killed = Instant::now();
    if leader == "a" {
        a.kill();
    } else {
        b.kill();
    }
    let standby = if leader == "a" { "b" } else { "a" };
    eventually(
        Duration::from_secs(30),
        "the standby to hold the Lease",
        || async { (holder() == standby).then_some(()) },
    )
    .await;
    let api = services(&cluster).await;
    api.create(&PostParams::default(), &load_balancer("after", &[]))
        .await
        .unwrap();
    let got = wait_ips(&cluster, "after").await;
    eprintln!(
        "standby {standby} took over and assigned a new Service {:?} after the kill",
        killed.elapsed()
    );
    let mut now = cluster.ips("default").await;
    now.remove("after");
    assert_eq!(now, before, "an IP moved during the handover");
    assert!(
        !before.values().any(|v| v == &got),
        "double-assigned {got:?}"
    );
}

#[tokio::test]
async fn a_replica_whose_lease_is_taken_stops_at_once() {
    let cluster = Cluster::start().await;
    let controller = cluster.controller("a", &[]).await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.30"]));
    let api = services(&cluster).await;
    api.create(&PostParams::default(), &load_balancer("before", &[]))
        .await
        .unwrap();
    wait_ips(&cluster, "before").await;
    // Somebody else holds the Lease now, for an hour (as after a partition during which
    // the standby took it).
    let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ");
    cluster.kubectl(&[
        "patch",
        "lease",
        "-n",
        NAMESPACE,
        "ferrolb-controller",
        "--type=merge",
        "-p",
        &format!(
            r#"{{"spec": {{"holderIdentity": "intruder", "renewTime": "{now}", "leaseDurationSeconds": 3600}}}}"#
        ),
    ]);
    eventually(
        DEADLINE,
        "the controller to stop, naming the holder",
        || async {
            controller
                .logs()
                .contains("stopping: Lease ferrolb-system/ferrolb-controller is held by intruder")
                .then_some(())
        },
    )
    .await;
    eventually(DEADLINE, "ferrolb_controller_leader 0", || async {
        (controller.metric("ferrolb_controller_leader") == Some(0.0)).then_some(())
    })
    .await;
    // Nothing is assigned while it stands by, and it does not start again and again.
    api.create(&PostParams::default(), &load_balancer("after", &[]))
        .await
        .unwrap();
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        assert!(
            ips_of(&cluster, "after").await.is_empty(),
            "assigned without the Lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs = controller.logs();
    assert_eq!(
        logs.matches("became the active controller").count(),
        1,
        "{logs}"
    );
}

#[tokio::test]
async fn a_removed_rbac_rule_fails_loudly() {
    let cluster = Cluster::start().await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.20"]));
    // Without the right to write Service status.
    let role = cluster.chart("templates/controller-rbac.yaml");
    let weakened = role.replace(
        "    resources: [services/status]\n    verbs: [patch]",
        "    resources: [services/status]\n    verbs: [get]",
    );
    assert_ne!(role, weakened);
    cluster.apply(&weakened);
    let controller = cluster.controller("a", &[]).await;
    services(&cluster)
        .await
        .create(&PostParams::default(), &load_balancer("web", &[]))
        .await
        .unwrap();
    eventually(
        DEADLINE,
        "a log line naming the missing permission",
        || async {
            controller
                .logs()
                .contains("needs patch on services/status")
                .then_some(())
        },
    )
    .await;
    assert!(ips_of(&cluster, "web").await.is_empty());
    assert!(controller
        .metric("ferrolb_controller_api_errors_total{resource=\"services/status\",verb=\"patch\",error=\"forbidden\"}")
        .is_some_and(|n| n >= 1.0));

    // Without the right to list namespaces: never ready, and /readyz says why.
    let weakened = role.replace(
        "    resources: [namespaces]\n    verbs: [list, watch]",
        "    resources: [namespaces]\n    verbs: [get]",
    );
    cluster.apply(&weakened);
    drop(controller);
    // Not waiting for the killed replica's Lease to expire.
    let controller = cluster.controller("b", &["--leader-elect=false"]).await;
    let (code, body) = eventually(DEADLINE, "/readyz to explain", || async {
        controller
            .http_get("/readyz")
            .filter(|(_, body)| body.contains("namespaces"))
    })
    .await;
    assert_eq!(code, 503);
    assert!(body.contains("forbidden"), "{body}");
    assert!(
        body.contains("needs list and watch on namespaces"),
        "{body}"
    );
}

#[tokio::test]
async fn a_pool_status_refused_by_rbac_is_retried_ever_more_slowly() {
    let cluster = Cluster::start().await;
    let role = cluster.chart("templates/controller-rbac.yaml");
    let weakened = role.replace(
        "    resources: [ipaddresspools/status]\n    verbs: [patch]",
        "    resources: [ipaddresspools/status]\n    verbs: [get]",
    );
    assert_ne!(role, weakened);
    cluster.apply(&weakened);
    let controller = cluster.controller("a", &["--leader-elect=false"]).await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.20"]));
    // Each failed write logs the delay before the next; they grow until one is a
    // second or more, instead of a write every flush (4 a second) for ever.
    let failures = eventually(DEADLINE, "a retry delay of a second or more", || async {
        let logs = controller.logs();
        let delays: Vec<Duration> = logs
            .lines()
            .filter(|l| l.contains("cannot write the pool's status"))
            .map(|l| {
                assert!(l.contains("needs patch on ipaddresspools/status"), "{l}");
                retry_in(l)
            })
            .collect();
        delays
            .iter()
            .any(|d| *d >= Duration::from_secs(1))
            .then_some(delays)
    })
    .await;
    // 100 ms doubling with jitter: a second is reached by the 5th to 8th failure.
    assert!(failures.len() <= 8, "{failures:?}");
    let refused = controller
        .metric("ferrolb_controller_api_errors_total{resource=\"ipaddresspools/status\",verb=\"patch\",error=\"forbidden\"}")
        .expect("the refused writes are counted");
    assert!(
        refused >= failures.len() as f64,
        "{refused} < {}",
        failures.len()
    );
}

/// The `retry_in` field of a log line (a Duration's Debug: `1.2s`, `340.5ms`).
fn retry_in(line: &str) -> Duration {
    let value = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("retry_in="))
        .unwrap_or_else(|| panic!("no retry_in in {line}"));
    let (number, unit) = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| value.split_at(i))
        .unwrap_or_else(|| panic!("{value}"));
    let number: f64 = number.parse().unwrap_or_else(|_| panic!("{value}"));
    Duration::from_secs_f64(match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" => number / 1e6,
        "ns" => number / 1e9,
        _ => panic!("unit of {value}"),
    })
}

#[tokio::test]
async fn a_concurrent_writer_causes_conflicts_that_are_retried() {
    let cluster = Cluster::start().await;
    let controller = cluster.controller("a", &["--leader-elect=false"]).await;
    controller.wait_ready().await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.40"]));
    let api = services(&cluster).await;
    let conflicts = || {
        controller
            .metric("ferrolb_controller_api_errors_total{resource=\"services/status\",verb=\"patch\",error=\"conflict\"}")
            .unwrap_or(0.0)
    };
    // Each Service is edited without pause from the moment it exists, so the
    // controller's status write, made from the version it saw, meets a newer one.
    let mut expected: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for round in 0..10 {
        let name = format!("busy-{round}");
        api.create(&PostParams::default(), &load_balancer(&name, &[]))
            .await
            .unwrap();
        let mut edits = 0;
        let ips = loop {
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(
                    serde_json::json!({"metadata": {"labels": {"edit": edits.to_string()}}}),
                ),
            )
            .await
            .unwrap();
            edits += 1;
            let now = ips_of(&cluster, &name).await;
            if !now.is_empty() {
                break now;
            }
            assert!(edits < 2000, "{name} never got an IP");
        };
        expected.insert(name, ips);
        if conflicts() >= 1.0 {
            break;
        }
    }
    assert!(conflicts() >= 1.0, "no conflict happened in 10 rounds");
    // Every Service kept one distinct address.
    let all: Vec<&Vec<IpAddr>> = expected.values().collect();
    let mut distinct = all.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), all.len(), "{expected:?}");
    let mut now = cluster.ips("default").await;
    now.retain(|name, _| name.starts_with("busy-"));
    assert_eq!(now, expected);
}

/// Issue 22, item 3: another controller (MetalLB's left running, say) that rewrites the
/// IPs ferrolb wrote is named in a Warning Event, once, and not fought: without that,
/// each of its writes would be undone and the Service's IP would flap.
#[tokio::test]
async fn another_controller_rewriting_the_ips_is_reported_and_not_fought() {
    let cluster = Cluster::start().await;
    let controller = cluster.controller("a", &["--leader-elect=false"]).await;
    controller.wait_ready().await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.40"]));
    let api = services(&cluster).await;
    api.create(&PostParams::default(), &load_balancer("web", &[]))
        .await
        .unwrap();
    assert_eq!(wait_ips(&cluster, "web").await, vec![ip("198.51.100.10")]);
    let status_writes = || {
        controller
            .metric("ferrolb_controller_api_writes_total{kind=\"service_status\"}")
            .unwrap_or(0.0)
    };
    let before = status_writes();
    // The rival takes the Service over: an IP of its own, then none, then another.
    let rival = PatchParams {
        field_manager: Some("metallb-controller".into()),
        ..Default::default()
    };
    for ingress in [
        serde_json::json!([{"ip": "10.9.9.9"}]),
        serde_json::Value::Null,
        serde_json::json!([{"ip": "10.9.9.10"}]),
    ] {
        let expected: Vec<IpAddr> = ingress
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| ip(i["ip"].as_str().unwrap()))
            .collect();
        api.patch_status(
            "web",
            &rival,
            &Patch::Merge(serde_json::json!({"status": {"loadBalancer": {"ingress": ingress}}})),
        )
        .await
        .unwrap();
        eventually(DEADLINE, "the StatusConflict event", || async {
            cluster
                .event_reasons("default", "web")
                .contains(&"StatusConflict".to_string())
                .then_some(())
        })
        .await;
        // A label edit is seen after the rival's write: once it is, the controller has
        // decided on that write too.
        api.patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"seen": expected.len().to_string()}}}),
            ),
        )
        .await
        .unwrap();
        assert_eq!(
            ips_of(&cluster, "web").await,
            expected,
            "the rival's write stands"
        );
    }
    let described = cluster.kubectl(&["describe", "svc", "web"]);
    assert!(
        described.contains("by \"metallb-controller\" after ferrolb wrote 198.51.100.10"),
        "{described}"
    );
    let reasons = cluster.event_reasons("default", "web");
    assert_eq!(
        reasons.iter().filter(|r| *r == "StatusConflict").count(),
        1,
        "{reasons:?}"
    );
    assert_eq!(status_writes(), before, "ferrolb wrote the status again");
    // A new Service still gets an address, not the one the rival holds.
    api.create(&PostParams::default(), &load_balancer("api", &[]))
        .await
        .unwrap();
    assert_eq!(wait_ips(&cluster, "api").await, vec![ip("198.51.100.10")]);
}

#[tokio::test]
async fn an_api_server_outage_loses_nothing() {
    let mut cluster = Cluster::start().await;
    let controller = cluster.controller("a", &["--leader-elect=false"]).await;
    controller.wait_ready().await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.40"]));
    cluster.create_services("default", "early", 5).await;
    let before = eventually(DEADLINE, "5 assigned", || async {
        let ips = cluster.ips("default").await;
        (ips.values().filter(|v| !v.is_empty()).count() == 5).then_some(ips)
    })
    .await;

    // The controller is frozen while Services arrive, then finds the API server gone
    // when it resumes: its writes fail and must be retried once it is back.
    let pid = nix::unistd::Pid::from_raw(controller.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    cluster.create_services("default", "during", 5).await;
    cluster.cp.stop_apiserver();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    // What /readyz said last goes in the failure message (a CI run once timed out here
    // with nothing in the controller's log).
    eventually_or(DEADLINE, "/readyz to report the outage", || async {
        match controller.http_get("/readyz") {
            Some((503, _)) => Ok(()),
            Some(answer) => Err(format!("{answer:?}")),
            None => Err("no answer".into()),
        }
    })
    .await;
    cluster.cp.start_apiserver().await.unwrap();

    let after = eventually(Duration::from_secs(60), "10 assigned", || async {
        let ips = cluster.ips("default").await;
        (ips.values().filter(|v| !v.is_empty()).count() == 10).then_some(ips)
    })
    .await;
    for (name, ips) in &before {
        assert_eq!(&after[name], ips, "{name} moved");
    }
    let mut all: Vec<&Vec<IpAddr>> = after.values().filter(|v| !v.is_empty()).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 10, "double assignment: {after:?}");
    controller.wait_ready().await;
}

/// A node's record, as its speaker writes it (here by the admin: what is under test is
/// the controller).
fn node_record(node: &str, ip: &str, interfaces: &[&str], service: &str, since: &str) -> String {
    format!(
        "apiVersion: ferrolb.io/v1beta1\nkind: NodeAnnouncement\n\
         metadata: {{name: {node}, namespace: {NAMESPACE}}}\n\
         spec: {{count: 1, ips: [{{ip: \"{ip}\", interfaces: {interfaces:?}, services: [{service}], since: \"{since}\"}}]}}\n"
    )
}

fn announced(cluster: &Cluster, name: &str) -> String {
    cluster.kubectl(&[
        "get",
        "svc",
        name,
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"ferrolb.io/AnnouncedIPv4\")].message}",
    ])
}

/// Issue 21, item 3: the speakers no longer write Services; the controller (the chart's
/// account) turns each node's NodeAnnouncement into the Service's condition and Event,
/// follows the newest claim, and ignores claims on IPs the Service does not hold.
#[tokio::test]
async fn nodes_records_become_the_services_announced_condition() {
    let cluster = Cluster::start().await;
    let _controller = cluster.controller("a", &[]).await;
    cluster.apply(&pool("lab", &["198.51.100.10-198.51.100.20"]));
    services(&cluster)
        .await
        .create(&PostParams::default(), &load_balancer("web", &[]))
        .await
        .unwrap();
    let vip = wait_ips(&cluster, "web").await[0];

    cluster.apply(&node_record(
        "node-a",
        &vip.to_string(),
        &["eth0"],
        "default/web",
        "2026-01-01T00:00:01.000000Z",
    ));
    let want = format!("{vip} is announced by node-a on eth0");
    eventually(DEADLINE, &format!("the condition '{want}'"), || async {
        (announced(&cluster, "web") == want).then_some(())
    })
    .await;
    eventually(DEADLINE, "the NodeAssigned Event", || async {
        cluster
            .event_reasons("default", "web")
            .iter()
            .any(|r| r == "NodeAssigned")
            .then_some(())
    })
    .await;

    // node-b takes the IP over (a newer claim) while node-a's record still claims it, as
    // when node-a died: the newest claim shows.
    cluster.apply(&node_record(
        "node-b",
        &vip.to_string(),
        &["eth1"],
        "default/web",
        "2026-01-01T00:00:05.000000Z",
    ));
    let want = format!("{vip} is announced by node-b on eth1");
    eventually(DEADLINE, &format!("the condition '{want}'"), || async {
        (announced(&cluster, "web") == want).then_some(())
    })
    .await;
    let assigned = || {
        cluster
            .event_reasons("default", "web")
            .iter()
            .filter(|r| *r == "NodeAssigned")
            .count()
    };
    eventually(DEADLINE, "a second NodeAssigned Event", || async {
        (assigned() == 2).then_some(())
    })
    .await;

    // A claim on an IP the Service does not hold changes nothing, even the newest.
    cluster.apply(&node_record(
        "node-c",
        "198.51.100.20",
        &["eth0"],
        "default/web",
        "2026-01-01T00:00:09.000000Z",
    ));
    // Then node-b gives the IP up: the condition says no node announces it, which also
    // shows that node-c's record was read before it (records are read in order).
    cluster.apply(&node_record(
        "node-b",
        &vip.to_string(),
        &[],
        "default/web",
        "2026-01-01T00:00:10.000000Z",
    ));
    eventually(
        DEADLINE,
        "the condition to say no node announces it",
        || async {
            announced(&cluster, "web")
                .starts_with(&format!("{vip} is announced by no node"))
                .then_some(())
        },
    )
    .await;
    assert!(!announced(&cluster, "web").contains("node-c"));
    // Written once per change: two NodeAssigned, one NoEligibleNode.
    eventually(DEADLINE, "the NoEligibleNode Event", || async {
        cluster
            .event_reasons("default", "web")
            .iter()
            .any(|r| r == "NoEligibleNode")
            .then_some(())
    })
    .await;
    assert_eq!(assigned(), 2);
}
