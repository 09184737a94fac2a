//! Interface discovery against a real kernel: each test builds its links in a network
//! namespace of its own, reads them back over rtnetlink, and checks what `select`
//! makes of them and how fast `watch` notices changes.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use ferrolb_speaker::interfaces::{self, Link};
use ipnetwork::IpNetwork;
use support::{Netns, run, unique};
use tokio::sync::watch;

/// Generous: a change normally shows up in about a millisecond; CI machines are slow.
const DEADLINE: Duration = Duration::from_secs(5);

/// `ip` for use inside [`Netns::run`], where the thread is already in the namespace.
fn ip_here(args: &str) -> anyhow::Result<()> {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

fn find<'a>(links: &'a [Link], name: &str) -> anyhow::Result<&'a Link> {
    links
        .iter()
        .find(|l| l.name == name)
        .with_context(|| format!("no link {name} in {links:#?}"))
}

fn has(links: &[Link], name: &str) -> bool {
    links.iter().any(|l| l.name == name)
}

fn index(links: &[Link], name: &str) -> u32 {
    find(links, name).map(|l| l.index).unwrap_or(u32::MAX)
}

fn names(links: &[Link], indexes: &[u32]) -> Vec<String> {
    let mut names: Vec<String> = indexes
        .iter()
        .map(|i| {
            links
                .iter()
                .find(|l| l.index == *i)
                .map_or(format!("#{i}"), |l| l.name.clone())
        })
        .collect();
    names.sort();
    names
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn net(s: &str) -> IpNetwork {
    s.parse().expect("test network")
}

/// The names `select` picks for `addr` with the default rule.
fn default_choice(links: &[Link], addr: &str) -> Vec<String> {
    let selection = interfaces::select(links, ip(addr), &[]);
    names(links, &selection.links)
}

async fn snapshot_here() -> anyhow::Result<Vec<Link>> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    interfaces::snapshot(&handle).await
}

/// Re-reads links until `ready` holds (link state such as a bridge's carrier settles
/// asynchronously), then returns them.
async fn snapshot_when(ready: impl Fn(&[Link]) -> bool) -> anyhow::Result<Vec<Link>> {
    let start = Instant::now();
    loop {
        let links = snapshot_here().await?;
        if ready(&links) {
            return Ok(links);
        }
        if start.elapsed() > DEADLINE {
            bail!("links never reached the expected state: {links:#?}");
        }
        tokio::task::yield_now().await;
    }
}

/// Waits until the watched links satisfy `done`; returns how long that took.
async fn changed_within(
    rx: &mut watch::Receiver<Vec<Link>>,
    what: &str,
    done: impl FnMut(&Vec<Link>) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let outcome = tokio::time::timeout(DEADLINE, rx.wait_for(done))
        .await
        .map(|seen| seen.is_ok());
    match outcome {
        Ok(true) => {
            let took = start.elapsed();
            println!("watch noticed {what} in {took:?}");
            Ok(took)
        }
        Ok(false) => bail!("watch stopped before noticing {what}"),
        Err(_) => bail!(
            "watch did not notice {what} within {DEADLINE:?}; last view: {:#?}",
            *rx.borrow()
        ),
    }
}

#[test]
fn snapshot_reports_flags_masters_and_addresses_and_select_follows_the_rules() -> anyhow::Result<()>
{
    let ns = Netns::new(unique("flbif"))?;
    // lo up; eth0 (veth, fixed MAC) with the documentation prefixes; a bridge with a
    // port; a NOARP link; a link left down.
    for cmd in [
        "link set lo up",
        "link add eth0 address 02:00:00:00:00:10 type veth peer name eth0p",
        "addr add 192.0.2.10/24 dev eth0",
        "addr add 2001:db8::10/64 dev eth0 nodad",
        "link set eth0 up",
        "link set eth0p up",
        "link add br0 address 02:00:00:00:00:20 type bridge",
        "link add port0 type veth peer name port0p",
        "link set port0 master br0",
        "addr add 198.51.100.1/24 dev br0",
        "link set br0 up",
        "link set port0 up",
        "link set port0p up",
        "link add noarp0 type veth peer name noarp0p",
        "link set noarp0 arp off",
        "link set noarp0 up",
        "link set noarp0p up",
        "link add down0 type veth peer name down0p",
        "addr add 203.0.113.1/24 dev down0",
        "link set down0p up",
        "route add default via 192.0.2.1 dev eth0",
        "-6 route add default via 2001:db8::1 dev eth0",
    ] {
        ns.ip(cmd)?;
    }

    ns.run(|| async {
        let links = snapshot_when(|links| {
            ["eth0", "br0", "noarp0"]
                .iter()
                .all(|n| find(links, n).is_ok_and(|l| l.up))
        })
        .await?;

        let lo = find(&links, "lo")?;
        assert!(
            lo.loopback && lo.up && !lo.noarp && lo.master.is_none(),
            "{lo:?}"
        );
        assert!(lo.addresses.contains(&net("127.0.0.1/8")), "{lo:?}");

        let eth0 = find(&links, "eth0")?;
        assert_eq!(eth0.mac, Some([2, 0, 0, 0, 0, 0x10]));
        assert!(
            eth0.up && !eth0.noarp && !eth0.loopback && eth0.master.is_none(),
            "{eth0:?}"
        );
        assert!(eth0.addresses.contains(&net("192.0.2.10/24")), "{eth0:?}");
        assert!(eth0.addresses.contains(&net("2001:db8::10/64")), "{eth0:?}");

        let br0 = find(&links, "br0")?;
        assert_eq!(br0.mac, Some([2, 0, 0, 0, 0, 0x20]));
        assert!(br0.up && br0.master.is_none(), "{br0:?}");
        assert!(br0.addresses.contains(&net("198.51.100.1/24")), "{br0:?}");
        let port0 = find(&links, "port0")?;
        assert_eq!(port0.master, Some(br0.index), "{port0:?}");
        assert_eq!(find(&links, "port0p")?.master, None);

        let noarp0 = find(&links, "noarp0")?;
        assert!(noarp0.noarp && noarp0.up, "{noarp0:?}");
        let down0 = find(&links, "down0")?;
        assert!(!down0.up && !down0.noarp, "{down0:?}");
        assert!(
            down0.addresses.contains(&net("203.0.113.1/24")),
            "{down0:?}"
        );
        // Administratively up, but its peer is down: no carrier, so not usable.
        assert!(!find(&links, "down0p")?.up);

        // The subnet rule, both families.
        assert_eq!(default_choice(&links, "192.0.2.200"), ["eth0"]);
        assert_eq!(default_choice(&links, "2001:db8::200"), ["eth0"]);
        assert_eq!(default_choice(&links, "198.51.100.200"), ["br0"]);
        // The subnet is on a down link: announced nowhere, not elsewhere.
        assert!(default_choice(&links, "203.0.113.200").is_empty());
        // No subnet anywhere: the link of the route to it (here the default route),
        // never every link (eth0p, port0p and noarp0p stand for Pod veths here).
        assert!(eth0.routes.contains(&net("0.0.0.0/0")), "{eth0:?}");
        assert!(eth0.routes.contains(&net("::/0")), "{eth0:?}");
        assert_eq!(default_choice(&links, "10.99.0.1"), ["eth0"]);
        assert_eq!(default_choice(&links, "2001:db8:99::1"), ["eth0"]);

        // An explicit list: a bridge port announces on the bridge; the rest are problems.
        let wanted: Vec<String> = ["port0", "eth0", "down0", "noarp0", "ghost0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let selection = interfaces::select(&links, ip("192.0.2.200"), &wanted);
        assert_eq!(names(&links, &selection.links), ["br0", "eth0"]);
        let problems = selection.problems.join("\n");
        assert_eq!(selection.problems.len(), 3, "{problems}");
        for name in ["down0", "noarp0", "ghost0"] {
            assert!(problems.contains(&format!("\"{name}\"")), "{problems}");
        }
        Ok(())
    })
}

#[test]
fn watch_notices_carrier_loss_admin_down_removal_addition_and_enslavement() -> anyhow::Result<()> {
    let ns = Netns::new(unique("flbif"))?;
    for cmd in [
        "link add eth0 type veth peer name eth0p",
        "addr add 192.0.2.10/24 dev eth0",
        "link set eth0 up",
        "link set eth0p up",
        "link add br0 type bridge",
        "link set br0 up",
    ] {
        ns.ip(cmd)?;
    }

    let timings = ns.run(|| async {
        let mut rx = interfaces::watch().await?;
        let vip = "192.0.2.200";
        let mut timings = Vec::new();
        // Carrier and addresses settle asynchronously; the channel catches up.
        timings.push(
            changed_within(&mut rx, "initial eth0 up", |l| {
                default_choice(l, vip) == ["eth0"]
            })
            .await?,
        );

        // The far end goes away: eth0 loses its carrier while still admin up.
        ip_here("link set eth0p down")?;
        timings.push(
            changed_within(&mut rx, "carrier loss", |l| {
                find(l, "eth0").is_ok_and(|l| !l.up) && default_choice(l, vip).is_empty()
            })
            .await?,
        );
        ip_here("link set eth0p up")?;
        timings.push(
            changed_within(&mut rx, "carrier back", |l| {
                default_choice(l, vip) == ["eth0"]
            })
            .await?,
        );

        ip_here("link set eth0 down")?;
        timings.push(
            changed_within(&mut rx, "admin down", |l| default_choice(l, vip).is_empty()).await?,
        );

        ip_here("link del eth0")?;
        timings.push(
            changed_within(&mut rx, "removal", |l| !has(l, "eth0") && !has(l, "eth0p")).await?,
        );
        // No subnet holds the VIP any more, and no route does: announced nowhere (not
        // on the bridge that is left).
        let now = rx.borrow().clone();
        assert_eq!(default_choice(&now, vip), Vec::<String>::new(), "{now:#?}");

        ip_here("link add new0 type veth peer name new0p")?;
        ip_here("addr add 192.0.2.11/24 dev new0")?;
        ip_here("link set new0 up")?;
        ip_here("link set new0p up")?;
        timings.push(
            changed_within(&mut rx, "a new link with the subnet", |l| {
                default_choice(l, vip) == ["new0"]
            })
            .await?,
        );

        // A VIP on no subnet follows the route to it, as soon as the route appears.
        ip_here("route add 198.51.100.0/24 via 192.0.2.1 dev new0")?;
        timings.push(
            changed_within(&mut rx, "a new route", |l| {
                default_choice(l, "198.51.100.7") == ["new0"]
            })
            .await?,
        );

        ip_here("addr add 2001:db8::11/64 dev new0 nodad")?;
        timings.push(
            changed_within(&mut rx, "a new IPv6 address", |l| {
                default_choice(l, "2001:db8::200") == ["new0"]
            })
            .await?,
        );

        ip_here("link set new0 master br0")?;
        timings.push(
            changed_within(&mut rx, "enslavement to a bridge", |l| {
                let br0 = index(l, "br0");
                find(l, "new0").is_ok_and(|n| n.master == Some(br0))
                    && default_choice(l, vip) == ["br0"]
            })
            .await?,
        );
        anyhow::Ok(timings)
    })?;
    let worst = timings.iter().max().copied().unwrap_or_default();
    println!("watch notification latencies: {timings:?} (worst {worst:?})");
    Ok(())
}

#[test]
fn watch_reflects_its_own_namespace_only() -> anyhow::Result<()> {
    // Two namespaces, two watchers: each sees its own links. This is what lets the lab
    // run one speaker per node namespace on one kernel.
    let a = Netns::new(unique("flbif"))?;
    let b = Netns::new(unique("flbif"))?;
    a.ip("link add only-a type veth peer name only-ap")?;
    b.ip("link add only-b type veth peer name only-bp")?;
    let seen_a = a.run(|| async { Ok(interfaces::watch().await?.borrow().clone()) })?;
    let seen_b = b.run(|| async { Ok(interfaces::watch().await?.borrow().clone()) })?;
    assert!(
        has(&seen_a, "only-a") && !has(&seen_a, "only-b"),
        "{seen_a:#?}"
    );
    assert!(
        has(&seen_b, "only-b") && !has(&seen_b, "only-a"),
        "{seen_b:#?}"
    );
    Ok(())
}
