//! `IPAddressPool`: where external IPs come from and who may have them.

// clippy reads the repeated `type_ = ...` inside kube's printcolumn(...) lists as
// duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The most `spec.addresses` entries the CRD accepts (its `maxItems`).
pub const MAX_ADDRESSES: usize = 256;

/// A set of addresses ferrolb may hand to LoadBalancer Services.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrolb.io",
    version = "v1beta1",
    kind = "IPAddressPool",
    doc = "A set of addresses ferrolb hands to LoadBalancer Services.",
    plural = "ipaddresspools",
    shortname = "ippool",
    category = "ferrolb",
    derive = "PartialEq",
    status = "IPAddressPoolStatus",
    printcolumn(name = "Addresses", type_ = "string", json_path = ".spec.addresses"),
    printcolumn(
        name = "From Node Network",
        type_ = "string",
        json_path = ".status.nodeNetwork.addresses"
    ),
    printcolumn(
        name = "Auto Assign",
        type_ = "boolean",
        json_path = ".spec.autoAssign"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Assigned IPv4",
        type_ = "integer",
        json_path = ".status.assignedIPv4"
    ),
    printcolumn(
        name = "Available IPv4",
        type_ = "integer",
        json_path = ".status.availableIPv4"
    ),
    printcolumn(
        name = "Assigned IPv6",
        type_ = "string",
        json_path = ".status.assignedIPv6"
    ),
    printcolumn(
        name = "Available IPv6",
        type_ = "string",
        json_path = ".status.availableIPv6"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": EXACTLY_ONE_SOURCE_RULE,
    "message": EXACTLY_ONE_SOURCE_MESSAGE,
}]))]
pub struct IPAddressPoolSpec {
    /// CIDRs (192.168.10.0/24, fd00::/120), ranges (192.168.10.10-192.168.10.20) or single
    /// IPs, IPv4 and IPv6 mixed freely. A CIDR must not have host bits set. Exactly one
    /// of addresses and fromNodeNetwork.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub addresses: Vec<AddressEntry>,
    /// Instead of addresses: the highest free addresses of the subnet the nodes are on,
    /// found by the speakers and written to status.nodeNetwork, then fixed. Meant for
    /// kind, labs and CI, where nothing else hands out that end of the subnet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_node_network: Option<FromNodeNetwork>,
    /// When false, the pool is used only by Services that ask for it by name
    /// (ferrolb.io/address-pool) or by IP (ferrolb.io/loadBalancerIPs).
    #[serde(default = "default_true", skip_serializing_if = "Option::is_none")]
    pub auto_assign: Option<bool>,
    /// Never hand out IPv4 addresses ending in .0 or .255, which some old clients treat
    /// as network or broadcast addresses.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "avoidBuggyIPs"
    )]
    pub avoid_buggy_ips: Option<bool>,
    /// Restricts the pool to some namespaces or Services and orders it among pools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
    /// Whether Services of different namespaces may share an IP of this pool when their
    /// ferrolb.io/allow-shared-ip keys match. Off by default: in a cluster shared by
    /// tenants, anyone who can create a Service could otherwise join another namespace's
    /// key and receive part of its traffic. Services already sharing an IP keep it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_sharing_across_namespaces: Option<bool>,
}

const EXACTLY_ONE_SOURCE_RULE: &str =
    "(has(self.addresses) && size(self.addresses) > 0) != has(self.fromNodeNetwork)";
const EXACTLY_ONE_SOURCE_MESSAGE: &str = "set exactly one of spec.addresses (the addresses to \
    hand out) and spec.fromNodeNetwork (take them from the nodes' subnet)";

/// A pool whose addresses come from the network the nodes are on.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FromNodeNetwork {
    /// How many addresses to take per family: the highest usable ones of the subnet.
    #[schemars(range(min = 1, max = MAX_FROM_NODE_NETWORK))]
    pub size: i32,
    /// IPv4, IPv6 or both; default: every family the nodes have an InternalIP of.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub families: Vec<crate::Family>,
}

/// The most addresses per family a `fromNodeNetwork` pool takes (the CRD's maximum).
pub const MAX_FROM_NODE_NETWORK: i32 = 4096;

impl FromNodeNetwork {
    /// The size as a count, when it is one the CRD accepts (1 to 4096).
    pub fn count(&self) -> Option<usize> {
        (1..=MAX_FROM_NODE_NETWORK)
            .contains(&self.size)
            .then_some(self.size as usize)
    }
}

fn default_true() -> Option<bool> {
    Some(true)
}

impl IPAddressPool {
    /// The entries the pool hands out from, and the field they are read from: its
    /// `spec.addresses`, or for a `fromNodeNetwork` pool the addresses its speakers
    /// resolved (none until then).
    pub fn entries(&self) -> (&'static str, &[AddressEntry]) {
        if self.spec.from_node_network.is_some() && self.spec.addresses.is_empty() {
            let resolved = self
                .status
                .as_ref()
                .and_then(|s| s.node_network.as_ref())
                .map_or(&[][..], |n| n.addresses.as_slice());
            ("status.nodeNetwork.addresses", resolved)
        } else {
            ("spec.addresses", &self.spec.addresses)
        }
    }

    /// What the speakers found for a `fromNodeNetwork` pool.
    pub fn node_network(&self) -> Option<&NodeNetworkStatus> {
        self.status.as_ref()?.node_network.as_ref()
    }
}

impl IPAddressPoolSpec {
    pub fn auto_assign(&self) -> bool {
        self.auto_assign.unwrap_or(true)
    }
    pub fn avoid_buggy_ips(&self) -> bool {
        self.avoid_buggy_ips.unwrap_or(false)
    }
    pub fn allow_sharing_across_namespaces(&self) -> bool {
        self.allow_sharing_across_namespaces.unwrap_or(false)
    }
}

/// The most entries in one of serviceAllocation's lists (namespaces, selectors).
pub const MAX_SELECTORS: usize = 64;

/// Which Services a pool serves, and its rank among the pools that could serve one.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Lower numbers are tried first; pools without a priority come after all pools
    /// with one. Among equal priorities, pools whose serviceAllocation selects the
    /// Service (by namespace or labels) come before open pools, then by pool name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Namespaces whose Services may use the pool. With namespaceSelectors, a namespace
    /// listed here or matched by a selector is allowed; with neither, every namespace.
    /// Each namespace once (as MetalLB refuses a repeat).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SELECTORS), extend("x-kubernetes-list-type" = "set"))]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SELECTORS), extend("x-kubernetes-validations" = [{
        "rule": crate::UNIQUE_RULE, "message": crate::UNIQUE_MESSAGE,
    }]))]
    pub namespace_selectors: Vec<LabelSelector>,
    /// When set, only Services whose labels match one of these selectors use the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_SELECTORS), extend("x-kubernetes-validations" = [{
        "rule": crate::UNIQUE_RULE, "message": crate::UNIQUE_MESSAGE,
    }]))]
    pub service_selectors: Vec<LabelSelector>,
}

/// One `spec.addresses` entry as written by the user.
///
/// The schema is written by hand: a plain string with CEL rules the API server checks
/// on `kubectl apply`, so a malformed pool is refused before any controller sees it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(transparent)]
pub struct AddressEntry(pub String);

impl From<&str> for AddressEntry {
    fn from(s: &str) -> Self {
        AddressEntry(s.to_string())
    }
}

/// CEL for one entry: an IP, a CIDR, or two IPs of one family joined by '-'.
const ENTRY_SHAPE_RULE: &str = "isIP(self) || isCIDR(self) || \
    (self.split('-').size() == 2 && isIP(self.split('-')[0].trim()) && isIP(self.split('-')[1].trim()) \
    && ip(self.split('-')[0].trim()).family() == ip(self.split('-')[1].trim()).family())";
const ENTRY_SHAPE_MESSAGE: &str = "must be a CIDR (192.168.10.0/24), a range of one family \
    (192.168.10.10-192.168.10.20) or a single IP";
const ENTRY_HOST_BITS_RULE: &str = "!isCIDR(self) || cidr(self).ip() == cidr(self).masked().ip()";
const ENTRY_HOST_BITS_MESSAGE: &str = "a CIDR must not have host bits set: write the network address (192.168.10.0/24, not 192.168.10.5/24)";
const ENTRY_WHOLE_FAMILY_RULE: &str = "!isCIDR(self) || cidr(self).prefixLength() > 0";
const ENTRY_WHOLE_FAMILY_MESSAGE: &str = "a /0 CIDR covers the whole address family";

impl JsonSchema for AddressEntry {
    fn schema_name() -> Cow<'static, str> {
        "AddressEntry".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": 100,
            "x-kubernetes-validations": [
                { "rule": ENTRY_SHAPE_RULE, "message": ENTRY_SHAPE_MESSAGE },
                { "rule": ENTRY_HOST_BITS_RULE, "message": ENTRY_HOST_BITS_MESSAGE },
                { "rule": ENTRY_WHOLE_FAMILY_RULE, "message": ENTRY_WHOLE_FAMILY_MESSAGE },
            ]
        })
    }
}

/// What the controller reports about a pool.
///
/// IPv4 counts are integers. IPv6 counts are decimal strings: a /64 alone holds 2^64
/// addresses, past what a JSON number or an int64 can carry exactly.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolStatus {
    /// Ready, Invalid (an entry cannot be parsed) and Overlapping (shares addresses with
    /// another pool); the message names the field and the other pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, rename = "assignedIPv4")]
    #[schemars(schema_with = "count_schema")]
    pub assigned_ipv4: u64,
    #[serde(default, rename = "availableIPv4")]
    #[schemars(schema_with = "count_schema")]
    pub available_ipv4: u64,
    #[serde(default, rename = "assignedIPv6")]
    pub assigned_ipv6: String,
    #[serde(default, rename = "availableIPv6")]
    pub available_ipv6: String,
    /// For a `fromNodeNetwork` pool: what the speakers resolved, written by them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_network: Option<NodeNetworkStatus>,
}

/// A count of IPv4 addresses: at most 2^32, so an `int64` (schemars would say
/// `uint64`, a format the API server does not know and warns about on every apply).
fn count_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "integer",
        "format": "int64",
        "minimum": 0,
    })
}

/// The addresses a `fromNodeNetwork` pool resolved to, and how. Written once by the
/// speaker elected for the pool; the addresses never change after that.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeNetworkStatus {
    /// The addresses the pool hands out, as ranges; empty while `problem` is set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub addresses: Vec<AddressEntry>,
    /// The subnet of each family the addresses come from, as configured on the nodes'
    /// interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 2))]
    pub subnets: Vec<String>,
    /// Addresses of the subnet's top end passed over, each with why: a node's IP, a
    /// default gateway, or another host answering for it on the wire.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub skipped: Vec<String>,
    /// The node whose speaker resolved the pool.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resolved_by: String,
    /// Why the pool could not be resolved (it is not Ready then; retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}
