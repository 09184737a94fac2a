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
    /// Interfaces to announce on. Empty: every interface with a subnet holding the IP,
    /// else the interface(s) of the node's route to it (never Pod veths or bridges).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), extend("x-kubernetes-list-type" = "set"))]
    pub interfaces: Vec<String>,
    /// `nodePort`: the owner DNATs VIP:port to its own InternalIP:nodePort, for
    /// clusters where nothing else handles LoadBalancer IPs.
    #[serde(default)]
    pub forwarding: Forwarding,
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
