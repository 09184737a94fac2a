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
    status = "IPAddressPoolStatus",
    printcolumn(name = "Addresses", type_ = "string", json_path = ".spec.addresses"),
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
pub struct IPAddressPoolSpec {
    /// CIDRs (192.168.10.0/24, fd00::/120), ranges (192.168.10.10-192.168.10.20) or single
    /// IPs, IPv4 and IPv6 mixed freely. A CIDR must not have host bits set.
    #[schemars(length(min = 1, max = 256))]
    pub addresses: Vec<AddressEntry>,
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
}

fn default_true() -> Option<bool> {
    Some(true)
}

impl IPAddressPoolSpec {
    pub fn auto_assign(&self) -> bool {
        self.auto_assign.unwrap_or(true)
    }
    pub fn avoid_buggy_ips(&self) -> bool {
        self.avoid_buggy_ips.unwrap_or(false)
    }
}

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
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace_selectors: Vec<LabelSelector>,
    /// When set, only Services whose labels match one of these selectors use the pool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
    pub assigned_ipv4: u64,
    #[serde(default, rename = "availableIPv4")]
    pub available_ipv4: u64,
    #[serde(default, rename = "assignedIPv6")]
    pub assigned_ipv6: String,
    #[serde(default, rename = "availableIPv6")]
    pub available_ipv6: String,
}
