//! What an import produces, whatever it converts from.

use std::collections::BTreeMap;

use ferrolb_api::{AddressEntry, IPAddressPool, L2Advertisement};
use serde_json::Value;

/// One YAML document and where it came from (`file.yaml, document 2`).
#[derive(Clone, Debug)]
pub struct Document {
    pub origin: String,
    pub value: Value,
}

/// ferrolb's objects for another load balancer's configuration, and what could not be
/// carried over.
#[derive(Debug, Default)]
pub struct Conversion {
    pub pools: Vec<IPAddressPool>,
    pub advertisements: Vec<L2Advertisement>,
    /// Parts with no ferrolb equivalent, each with why.
    pub not_carried: Vec<Finding>,
    /// What changed on the way but works the same (a renamed pool, a default).
    pub notes: Vec<String>,
    /// Objects that could not be read (naming the object and field): nothing of them is
    /// converted.
    pub errors: Vec<String>,
    /// Pools the other load balancer announces by BGP only: not converted; a Service
    /// holding one of their IPs would lose its traffic.
    pub bgp_only_pools: BTreeMap<String, Vec<AddressEntry>>,
    /// How many objects of the other load balancer (or legacy pools) were read.
    pub read: usize,
}

/// Something of the other load balancer's that ferrolb does not carry over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// `BGPPeer "metallb-system/tor"`, or `L2Advertisement "l2" spec.serviceSelectors`.
    pub what: String,
    pub why: String,
}

pub(super) const NO_BGP: &str = "ferrolb announces by Layer 2 (ARP and NDP) only; it has no BGP";
