//! The chart's pool as kind users write it: `fromNodeNetwork`, no address given.

use std::net::IpAddr;
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use ferrolb_api::address::parse_range;
use ferrolb_api::{Family, IPAddressPool, NodeNetworkStatus};
use kube::Api;

use crate::client::in_client;
use crate::cluster::{Cluster, DEADLINE, poll};
use crate::{Suite, report};

/// The chart's pool: `fromNodeNetwork`, this many addresses of each family.
pub const SIZE: u32 = 40;
/// The suite's own single-address pools start this far below the subnet's top, clear of
/// the chart's pool.
pub const SPARE_FROM_TOP: u32 = SIZE + 20;

/// The addresses a host on the segment already uses before ferrolb is installed: the
/// top of each subnet, where a `fromNodeNetwork` pool would start. Only on tests/nodes
/// clusters, whose client namespace the suite may change.
pub fn foreign(c: &Cluster) -> Vec<IpAddr> {
    if c.nodes.is_none() {
        return Vec::new();
    }
    let mut out = vec![IpAddr::V4(c.top4(0, 1)[0])];
    if let Some(net) = c.subnet6 {
        // The top of the /64 below RFC 2526's reserved anycast block.
        let last = u128::from(net.broadcast()) - 128;
        out.push(IpAddr::V6(last.into()));
    }
    out
}

/// Gives the client the [`foreign`] addresses, so that it answers ARP and DAD for them.
pub fn occupy(c: &Cluster) -> Result<()> {
    for ip in foreign(c) {
        let with_prefix = match ip {
            IpAddr::V4(_) => format!("{ip}/32"),
            IpAddr::V6(_) => format!("{ip}/128"),
        };
        let mut args = vec!["addr", "replace", with_prefix.as_str(), "dev", "eth0"];
        if ip.is_ipv6() {
            args.push("nodad");
        }
        in_client(&c.client, "ip", &args)?;
    }
    Ok(())
}

/// What the speakers resolved for the chart's pool, once they have.
pub async fn resolved(c: &Cluster) -> Result<NodeNetworkStatus> {
    let api: Api<IPAddressPool> = Api::all(c.client().await?);
    poll(
        "the chart's fromNodeNetwork pool to be resolved",
        DEADLINE,
        || async {
            let pool = api.get("e2e").await.ok()?;
            pool.node_network()
                .filter(|n| !n.addresses.is_empty())
                .cloned()
        },
    )
    .await
}

/// `fromNodeNetwork: {size: 40}` resolves to the top of the node subnet of each family:
/// inside it, never a node's address or the gateway, passing over an address a foreign
/// host answers for; the pool is Ready and the Service's IPs come from it.
pub fn from_node_network(suite: &Suite) -> Result<()> {
    suite.installed()?;
    let c = &suite.cluster;
    let started = Instant::now();
    let status = suite.block_on(resolved(c))?;
    let waited = started.elapsed();
    let nodes = suite.block_on(c.node_ips())?;
    let ranges: Vec<_> = status
        .addresses
        .iter()
        .map(|e| parse_range(&e.0).with_context(|| format!("status entry {:?}", e.0)))
        .collect::<Result<_>>()?;
    let count = |family: Family| -> u128 {
        ranges
            .iter()
            .filter(|r| r.family() == family)
            .map(|r| r.size())
            .sum()
    };
    ensure!(
        count(Family::V4) == u128::from(SIZE),
        "{} IPv4 addresses resolved, not {SIZE}: {:?}",
        count(Family::V4),
        status.addresses
    );
    let mut subnets = vec![c.subnet4.to_string()];
    if let Some(net) = c.subnet6 {
        subnets.push(net.to_string());
        ensure!(
            count(Family::V6) == u128::from(SIZE),
            "{} IPv6 addresses resolved, not {SIZE}: {:?}",
            count(Family::V6),
            status.addresses
        );
    }
    ensure!(
        status.subnets == subnets,
        "resolved on {:?}, the nodes are on {subnets:?}",
        status.subnets
    );
    let gateway = IpAddr::V4(c.subnet4.nth(1).context("a /31 or smaller subnet")?);
    for r in &ranges {
        let inside = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => c.subnet4.contains(v4),
            IpAddr::V6(v6) => c.subnet6.is_some_and(|n| n.contains(v6)),
        };
        let inside = inside(r.first_ip()) && inside(r.last_ip());
        ensure!(inside, "{r} is outside the node subnet");
        for (node, ip) in &nodes {
            ensure!(
                !r.contains(IpAddr::V4(*ip)),
                "{r} holds {node}'s address {ip}"
            );
        }
        ensure!(!r.contains(gateway), "{r} holds the gateway {gateway}");
    }
    for ip in foreign(c) {
        ensure!(
            !ranges.iter().any(|r| r.contains(ip)),
            "{ip}, which the client answers for, is in the pool: {:?}",
            status.addresses
        );
        ensure!(
            status
                .skipped
                .iter()
                .any(|s| s.starts_with(&format!("{ip}: answered on the wire by"))),
            "{ip} is not among the skipped addresses: {:?}",
            status.skipped
        );
    }
    ensure!(
        nodes.iter().any(|(n, _)| *n == status.resolved_by),
        "resolved by {:?}, not a node",
        status.resolved_by
    );
    // The Service every other case uses got its IPs from there.
    let web = suite.web()?;
    for ip in &web.ips {
        ensure!(
            ranges.iter().any(|r| r.contains(*ip)),
            "the Service's {ip} is not from the resolved pool {:?}",
            status.addresses
        );
    }
    report!(
        "fromNodeNetwork: resolved by {} ({:.1} s after install) to {} on {}; skipped {:?}",
        status.resolved_by,
        waited.as_secs_f64(),
        status
            .addresses
            .iter()
            .map(|e| e.0.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        status.subnets.join(", "),
        status.skipped
    );
    Ok(())
}
