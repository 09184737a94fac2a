//! What an import produces, whatever it converts from.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrolb_api::selector::Labels;
use ferrolb_api::{AddressEntry, IPAddressPool, L2Advertisement};
use ipnetwork::IpNetwork;
use serde::Deserialize;
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

impl Conversion {
    /// Objects in name order, so that output does not depend on input order.
    pub(super) fn sort(&mut self) {
        self.pools
            .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        self.advertisements
            .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    }
}

/// The metadata a converter reads of an object.
#[derive(Deserialize)]
pub(super) struct Meta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Option<Labels>,
}

/// Something of the other load balancer's that ferrolb does not carry over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// `BGPPeer "metallb-system/tor"`, or `L2Advertisement "l2" spec.serviceSelectors`.
    pub what: String,
    pub why: String,
}

pub(super) const NO_BGP: &str = "ferrolb announces by Layer 2 (ARP and NDP) only; it has no BGP";

/// A CIDR as the range without its first and last address (network and broadcast), as
/// Cilium (`allowFirstLastIPs: "No"`) and kube-vip (`skip-end-ips-in-cidr`) leave them
/// out; /31, /32, /127 and /128 stay whole (RFC 3021).
pub(super) fn cidr_without_ends(cidr: &str) -> Result<String, String> {
    let net: IpNetwork = cidr
        .trim()
        .parse()
        .map_err(|_| format!("{cidr:?} is not a CIDR"))?;
    let network = match net {
        IpNetwork::V4(n) => IpAddr::V4(n.network()),
        IpNetwork::V6(n) => IpAddr::V6(n.network()),
    };
    if net.ip() != network {
        return Err(format!(
            "{cidr:?} has host bits set (the network is {network}/{})",
            net.prefix()
        ));
    }
    let (first, last) = match net {
        IpNetwork::V4(n) if n.prefix() < 31 => (
            IpAddr::V4((u32::from(n.network()) + 1).into()),
            IpAddr::V4((u32::from(n.broadcast()) - 1).into()),
        ),
        IpNetwork::V6(n) if n.prefix() < 127 => {
            let base = u128::from(n.network());
            let host_bits = u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0);
            (
                IpAddr::V6((base + 1).into()),
                IpAddr::V6(((base | host_bits) - 1).into()),
            )
        }
        _ => return Ok(cidr.trim().to_string()),
    };
    Ok(format!("{first}-{last}"))
}
