//! `L2Advertisement`: which pools are announced at Layer 2, from which nodes, on which
//! interfaces, and whether the owner forwards VIP traffic to the Service's NodePort.

// clippy reads the repeated `type_ = ...` inside kube's printcolumn(...) lists as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Announce the IPs of some pools with ARP (IPv4) and NDP (IPv6).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrolb.io",
    version = "v1beta1",
    kind = "L2Advertisement",
    doc = "Announces the IPs of some pools at Layer 2 (ARP and NDP) from some nodes.",
    plural = "l2advertisements",
    shortname = "l2adv",
    category = "ferrolb",
    derive = "PartialEq",
    status = "L2AdvertisementStatus",
    printcolumn(name = "Pools", type_ = "string", json_path = ".spec.ipAddressPools"),
    printcolumn(name = "Interfaces", type_ = "string", json_path = ".spec.interfaces"),
    printcolumn(name = "Forwarding", type_ = "string", json_path = ".spec.forwarding"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    /// Pools announced by name. With neither this nor ipAddressPoolSelectors, every pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), extend("x-kubernetes-list-type" = "set"))]
    pub ip_address_pools: Vec<String>,
    /// Pools announced by label; combined with ipAddressPools by union.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-validations" = [{
        "rule": crate::UNIQUE_RULE, "message": crate::UNIQUE_MESSAGE,
    }]))]
    pub ip_address_pool_selectors: Vec<LabelSelector>,
    /// Nodes that may announce; a node matching any selector is eligible. Empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-validations" = [{
        "rule": crate::UNIQUE_RULE, "message": crate::UNIQUE_MESSAGE,
    }]))]
    pub node_selectors: Vec<LabelSelector>,
    /// Nodes that announce in preference to the others: each IP goes to the live,
    /// eligible node with the highest priority (by hash among equals), so the others
    /// announce only while none of those can. A node's priority is the highest of the
    /// entries whose selector matches it, 0 when none does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub node_priorities: Vec<NodePriority>,
    /// Interfaces to announce on. Empty: every interface with a subnet holding the IP,
    /// else the interface(s) of the node's route to it (never Pod veths or bridges).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "set"))]
    pub interfaces: Vec<String>,
    /// `nodePort`: the owner DNATs VIP:port to its own InternalIP:nodePort, for
    /// clusters where nothing else handles LoadBalancer IPs.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Gratuitous ARPs / unsolicited Neighbor Advertisements for this advertisement's
    /// IPs: how many when a node takes one, how far apart, and an optional periodic
    /// refresh. A field left out takes the speaker's default (`--announce-count`,
    /// `--announce-interval-ms`, `--refresh-secs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gratuitous: Option<Gratuitous>,
}

/// Bounds of [`NodePriority::priority`].
pub const PRIORITY_MIN: i32 = -1000;
pub const PRIORITY_MAX: i32 = 1000;

/// A priority for the nodes a selector matches.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodePriority {
    /// Higher wins (-1000..1000; nodes matching no entry have 0).
    #[schemars(range(min = PRIORITY_MIN, max = PRIORITY_MAX))]
    pub priority: i32,
    pub node_selector: LabelSelector,
}

/// Bounds of [`Gratuitous`], the same in the CRD and for files read by `plan`.
pub const GRATUITOUS_COUNT_MAX: i32 = 30;
pub const GRATUITOUS_INTERVAL_MIN_MS: i32 = 10;
pub const GRATUITOUS_INTERVAL_MAX_MS: i32 = 60_000;
/// A shorter refresh than this is refused: at 10k IPs one every 10 s is already 1,000
/// frames a second.
pub const GRATUITOUS_REFRESH_MIN_S: i32 = 10;
pub const GRATUITOUS_REFRESH_MAX_S: i32 = 86_400;

/// When a node sends gratuitous ARPs / unsolicited NAs for an IP. Where several
/// advertisements announce one IP, the one that announces most wins, field by field
/// (the highest count, the shortest interval, the shortest refresh).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.refreshSeconds) || self.refreshSeconds == 0 || self.refreshSeconds >= 10",
    "message": "refreshSeconds is 0 (off) or at least 10",
}]))]
pub struct Gratuitous {
    /// Sent on taking an IP, the first at once (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = GRATUITOUS_COUNT_MAX))]
    pub count: Option<i32>,
    /// Between them, so that a switch or client that missed one still updates
    /// (default 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = GRATUITOUS_INTERVAL_MIN_MS, max = GRATUITOUS_INTERVAL_MAX_MS))]
    pub interval_milliseconds: Option<i32>,
    /// Announce every owned IP again this often, for switches and clients whose tables
    /// age out entries that nothing refreshes (0: never; default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = GRATUITOUS_REFRESH_MAX_S))]
    pub refresh_seconds: Option<i32>,
}

impl Gratuitous {
    /// Field by field, what announces most of `self` and `other`.
    pub fn most(self, other: Gratuitous) -> Gratuitous {
        fn pick(a: Option<i32>, b: Option<i32>, f: fn(i32, i32) -> i32) -> Option<i32> {
            match (a, b) {
                (Some(a), Some(b)) => Some(f(a, b)),
                (a, b) => a.or(b),
            }
        }
        // A refresh of 0 is off, which announces least.
        let refresh = |a: i32, b: i32| match (a, b) {
            (0, x) | (x, 0) => x,
            (a, b) => a.min(b),
        };
        Gratuitous {
            count: pick(self.count, other.count, i32::max),
            interval_milliseconds: pick(
                self.interval_milliseconds,
                other.interval_milliseconds,
                i32::min,
            ),
            refresh_seconds: pick(self.refresh_seconds, other.refresh_seconds, refresh),
        }
    }

    /// The first field out of bounds, named (`spec.gratuitous.count 0 is out of 1..=30`).
    pub fn problem(&self) -> Option<String> {
        let out = |field: &str, v: i32, bounds: &str| {
            Some(format!("spec.gratuitous.{field} {v} is out of {bounds}"))
        };
        if let Some(c) = self.count
            && !(1..=GRATUITOUS_COUNT_MAX).contains(&c)
        {
            return out("count", c, &format!("1..={GRATUITOUS_COUNT_MAX}"));
        }
        if let Some(i) = self.interval_milliseconds
            && !(GRATUITOUS_INTERVAL_MIN_MS..=GRATUITOUS_INTERVAL_MAX_MS).contains(&i)
        {
            return out(
                "intervalMilliseconds",
                i,
                &format!("{GRATUITOUS_INTERVAL_MIN_MS}..={GRATUITOUS_INTERVAL_MAX_MS}"),
            );
        }
        if let Some(r) = self.refresh_seconds
            && r != 0
            && !(GRATUITOUS_REFRESH_MIN_S..=GRATUITOUS_REFRESH_MAX_S).contains(&r)
        {
            return out(
                "refreshSeconds",
                r,
                &format!("0 (off) or {GRATUITOUS_REFRESH_MIN_S}..={GRATUITOUS_REFRESH_MAX_S}"),
            );
        }
        None
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Forwarding {
    #[default]
    None,
    NodePort,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(count: Option<i32>, interval: Option<i32>, refresh: Option<i32>) -> Gratuitous {
        Gratuitous {
            count,
            interval_milliseconds: interval,
            refresh_seconds: refresh,
        }
    }

    #[test]
    fn several_advertisements_announce_as_much_as_the_most_announcing_one() {
        let a = g(Some(3), Some(200), Some(0));
        let b = g(Some(2), Some(100), None);
        assert_eq!(a.most(b), g(Some(3), Some(100), Some(0)));
        // Off (0) announces least: any refresh wins over it, the shorter over the longer.
        assert_eq!(
            g(None, None, Some(0)).most(g(None, None, Some(60))),
            g(None, None, Some(60))
        );
        assert_eq!(
            g(None, None, Some(30)).most(g(None, None, Some(60))),
            g(None, None, Some(30))
        );
        // Unset fields stay unset: the speaker's defaults apply.
        assert_eq!(
            Gratuitous::default().most(Gratuitous::default()),
            Gratuitous::default()
        );
    }

    #[test]
    fn out_of_bounds_fields_are_named() {
        assert_eq!(g(Some(5), Some(500), Some(0)).problem(), None);
        assert_eq!(g(None, None, Some(10)).problem(), None);
        assert_eq!(
            g(Some(0), None, None).problem().as_deref(),
            Some("spec.gratuitous.count 0 is out of 1..=30")
        );
        assert_eq!(
            g(None, Some(5), None).problem().as_deref(),
            Some("spec.gratuitous.intervalMilliseconds 5 is out of 10..=60000")
        );
        assert_eq!(
            g(None, None, Some(3)).problem().as_deref(),
            Some("spec.gratuitous.refreshSeconds 3 is out of 0 (off) or 10..=86400")
        );
    }
}
