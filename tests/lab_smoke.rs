//! The network-namespace lab itself, proven with the tools the end-to-end tests use:
//! the client reaches every node, ARP and NDP resolve to the nodes' MACs, pulling a
//! node's cable cuts it off, and labs vanish when dropped, even on panic.
//!
//! Needs root, iproute2, nftables, arping, ndisc6 and iputils-ping; without them every
//! test fails with a message saying what is missing (nothing is skipped silently).

use std::net::IpAddr;
use std::os::unix::process::ExitStatusExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::time::Duration;

use ferrolb::lab::{Host, Lab, poll_until};

const DEADLINE: Duration = Duration::from_secs(5);

fn lab(nodes: usize) -> Lab {
    if let Err(missing) = Lab::check_prerequisites() {
        panic!("{missing}");
    }
    Lab::new(nodes).unwrap_or_else(|e| panic!("{e:#}"))
}

fn listed_netns() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success(), "ip netns list: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // "name (id: 3)" once the namespace has an id.
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn assert_none_listed(names: &[String]) {
    let listed = listed_netns();
    let left: Vec<&String> = names.iter().filter(|n| listed.contains(n)).collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// One ping from `from` to `to`, waiting at most a second for the reply.
fn ping(from: &Host, to: impl Into<IpAddr>) -> bool {
    let to = to.into().to_string();
    from.command("ping", ["-c", "1", "-W", "1", "-n", &to])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn the_client_reaches_every_node_over_ipv4_and_ipv6() {
    let lab = lab(3);
    for node in lab.nodes() {
        assert!(ping(lab.client(), node.ipv4()), "ping {}", node.ipv4());
        assert!(ping(lab.client(), node.ipv6()), "ping {}", node.ipv6());
        assert!(
            ping(node, lab.client().ipv4()),
            "{} pings the client",
            node.name()
        );
    }
    // What the pings taught the client is what the lab says each node's MAC is.
    for node in lab.nodes() {
        assert_eq!(
            lab.client().neighbour(node.ipv4()).unwrap(),
            Some(node.mac())
        );
        assert_eq!(
            lab.client().neighbour(node.ipv6()).unwrap(),
            Some(node.mac())
        );
    }
    lab.client().flush_neighbours().unwrap();
    for node in lab.nodes() {
        assert_eq!(lab.client().neighbour(node.ipv4()).unwrap(), None);
        assert_eq!(lab.client().neighbour(node.ipv6()).unwrap(), None);
    }
}

#[test]
fn hosts_have_distinct_fixed_macs_and_addresses() {
    let lab = lab(2);
    let hosts: Vec<&Host> = lab.hosts().collect();
    assert_eq!(
        hosts.iter().map(|h| h.name()).collect::<Vec<_>>(),
        ["node0", "node1", "client"]
    );
    assert_eq!(lab.node(1).ipv4().to_string(), "192.0.2.11");
    assert_eq!(lab.node(1).ipv6().to_string(), "2001:db8::11");
    assert_eq!(lab.client().ipv4().to_string(), "192.0.2.100");
    assert_eq!(lab.client().ipv6().to_string(), "2001:db8::100");
    for (i, a) in hosts.iter().enumerate() {
        for b in &hosts[i + 1..] {
            assert_ne!(a.mac(), b.mac(), "{} and {}", a.name(), b.name());
        }
        // What the kernel has on eth0 is what the lab reports.
        let out = a
            .run("ip", ["-br", "link", "show", "dev", a.ifname()])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&a.mac_string()), "{}: {text}", a.name());
        let out = a
            .run("ip", ["-br", "addr", "show", "dev", a.ifname()])
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("{}/24", a.ipv4())), "{text}");
        assert!(text.contains(&format!("{}/64", a.ipv6())), "{text}");
        assert!(!text.contains("tentative"), "{text}");
        let out = a.run("ip", ["-br", "link", "show", "dev", "lo"]).unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("UNKNOWN"));
    }
}

#[test]
fn arping_from_the_client_gets_one_reply_from_the_nodes_mac() {
    let lab = lab(2);
    for node in lab.nodes() {
        assert_eq!(lab.client().arping(node.ipv4()), vec![node.mac()]);
    }
    // An address nobody holds gets no reply.
    assert_eq!(lab.client().arping([192, 0, 2, 77]), Vec::<[u8; 6]>::new());
}

#[test]
fn ndisc6_from_the_client_resolves_the_nodes_mac() {
    let lab = lab(2);
    for node in lab.nodes() {
        assert_eq!(lab.client().ndisc6(node.ipv6()), Some(node.mac()));
    }
    assert_eq!(
        lab.client()
            .ndisc6("2001:db8::77".parse::<IpAddr>().unwrap()),
        None
    );
}

#[test]
fn pulling_a_nodes_cable_cuts_it_off_until_it_is_plugged_back() {
    let lab = lab(2);
    let (lost, kept) = (lab.node(0), lab.node(1));
    assert!(ping(lab.client(), lost.ipv4()));

    lost.set_link(false).unwrap();
    assert!(!ping(lab.client(), lost.ipv4()));
    assert!(!ping(lab.client(), lost.ipv6()));
    assert!(lab.client().arping(lost.ipv4()).is_empty());
    assert!(
        ping(lab.client(), kept.ipv4()),
        "other nodes are unaffected"
    );
    // From inside, eth0 is still administratively up: the node is not told why.
    let out = lost
        .run("ip", ["-j", "link", "show", "dev", lost.ifname()])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"UP\""), "{text}");
    assert!(text.contains("NO-CARRIER"), "{text}");

    lost.set_link(true).unwrap();
    poll_until(DEADLINE, "node0 to answer pings again", || {
        ping(lab.client(), lost.ipv4()).then_some(())
    })
    .unwrap();
    poll_until(DEADLINE, "node0 to answer IPv6 pings again", || {
        ping(lab.client(), lost.ipv6()).then_some(())
    })
    .unwrap();
}

#[test]
fn lab_processes_run_inside_the_host_log_and_obey_signals() {
    let lab = lab(1);
    let node = lab.node(0);
    let mut talker = node
        .spawn(
            "sh",
            [
                "-c",
                "ip -br addr show dev eth0; echo oops >&2; exec sleep 600",
            ],
        )
        .unwrap();
    let stdout = poll_until(DEADLINE, "the process's first output line", || {
        talker.stdout().ok().filter(|s| s.ends_with('\n'))
    })
    .unwrap();
    assert!(
        stdout.contains(&node.ipv4().to_string()),
        "ran outside the node: {stdout}"
    );
    poll_until(DEADLINE, "stderr", || {
        talker.stderr().ok().filter(|s| s == "oops\n")
    })
    .unwrap();
    assert_eq!(talker.wait_timeout(Duration::from_millis(1)).unwrap(), None);
    talker.terminate().unwrap();
    let status = talker.wait_timeout(DEADLINE).unwrap().expect("exited");
    assert_eq!(status.signal(), Some(15));

    let mut crasher = node.spawn("sleep", ["600"]).unwrap();
    crasher.kill_hard().unwrap();
    let status = crasher.wait_timeout(DEADLINE).unwrap().expect("exited");
    assert_eq!(status.signal(), Some(9));

    // A failing command's error names the host and the command.
    let err = node
        .run("sh", ["-c", "echo bad thing >&2; exit 3"])
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("node0") && err.contains("exit 3") && err.contains("bad thing"),
        "{err}"
    );
}

#[test]
fn dropping_a_lab_deletes_its_namespaces_and_kills_what_runs_in_them() {
    let lab = lab(2);
    let names = lab.netns().to_vec();
    assert_eq!(names.len(), 4);
    let listed = listed_netns();
    assert!(
        names.iter().all(|n| listed.contains(n)),
        "{names:?} in {listed:?}"
    );
    // Started by hand, not through the lab: the lab still kills it.
    let mut stray = lab.node(1).command("sleep", ["600"]).spawn().unwrap();
    let log_dir = lab.log_dir().to_path_buf();
    let _logged = lab.client().spawn("sleep", ["600"]).unwrap();

    drop(lab);

    assert_none_listed(&names);
    assert!(!log_dir.exists());
    let status = poll_until(DEADLINE, "the stray process to die", || {
        stray.try_wait().unwrap()
    })
    .unwrap();
    assert_eq!(status.signal(), Some(9));
}

#[test]
fn a_panicking_test_still_leaves_no_namespaces() {
    let mut names = Vec::new();
    let mut log_dir = None;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let lab = lab(1);
        names = lab.netns().to_vec();
        log_dir = Some(lab.log_dir().to_path_buf());
        let _running = lab.node(0).spawn("sleep", ["600"]).unwrap();
        panic!("the test body fails while holding the lab");
    }));
    let payload = result.expect_err("the body panicked");
    assert_eq!(
        payload.downcast_ref::<&str>(),
        Some(&"the test body fails while holding the lab")
    );
    assert_eq!(names.len(), 3);
    assert_none_listed(&names);
    // Kept for the failure's post-mortem; this panic was on purpose.
    let log_dir = log_dir.unwrap();
    assert!(log_dir.exists());
    std::fs::remove_dir_all(log_dir).unwrap();
}

#[test]
fn two_labs_coexist_and_tear_down_independently() {
    let first = lab(2);
    let second = lab(2);
    assert_ne!(first.id(), second.id());
    // Same addresses, separate switches: each client reaches its own lab's node.
    assert_eq!(first.node(0).ipv4(), second.node(0).ipv4());
    assert_ne!(first.node(0).mac(), second.node(0).mac());
    assert_eq!(
        first.client().arping(first.node(0).ipv4()),
        vec![first.node(0).mac()]
    );
    assert_eq!(
        second.client().arping(second.node(0).ipv4()),
        vec![second.node(0).mac()]
    );
    assert_eq!(
        second.client().ndisc6(second.node(1).ipv6()),
        Some(second.node(1).mac())
    );

    let first_names = first.netns().to_vec();
    first.close().unwrap();
    assert_none_listed(&first_names);
    let listed = listed_netns();
    assert!(second.netns().iter().all(|n| listed.contains(n)));
    assert!(ping(second.client(), second.node(1).ipv4()));
    assert!(ping(second.client(), second.node(1).ipv6()));

    let second_names = second.netns().to_vec();
    drop(second);
    assert_none_listed(&second_names);
}

#[test]
fn lab_new_removes_what_crashed_runs_left_behind() {
    if let Err(missing) = Lab::check_prerequisites() {
        panic!("{missing}");
    }
    // A pid that just exited stands for a test process killed before its guards ran.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let stale = format!("ferrolb-lab-{}-0-switch", gone.id());
    // Our own pid with a counter no lab uses: alive, so it must be left alone.
    let live = format!("ferrolb-lab-{}-999999-switch", std::process::id());
    for ns in [&stale, &live] {
        let out = Command::new("ip")
            .args(["netns", "add", ns])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let _guards = (Remove(stale.clone()), Remove(live.clone()));

    let lab = lab(1);

    let listed = listed_netns();
    assert!(!listed.contains(&stale), "{stale} survived");
    assert!(
        listed.contains(&live),
        "{live} was removed though its process lives"
    );
    drop(lab);
}
