//! Service annotations ferrolb reads, with the MetalLB spellings it honours so that
//! existing manifests keep working.

use std::collections::BTreeMap;

/// Comma-separated IPs the Service asks for (one per family for dual-stack).
pub const LOAD_BALANCER_IPS: &str = "ferrolb.io/loadBalancerIPs";
/// Restricts allocation to one named pool.
pub const ADDRESS_POOL: &str = "ferrolb.io/address-pool";
/// Services with the same key may share an IP when their ports do not clash.
pub const ALLOW_SHARED_IP: &str = "ferrolb.io/allow-shared-ip";

/// Every spelling of each annotation, ferrolb's first: when a Service carries several,
/// ferrolb's own wins.
pub const LOAD_BALANCER_IPS_ALIASES: [&str; 3] = [
    LOAD_BALANCER_IPS,
    "metallb.io/loadBalancerIPs",
    "metallb.universe.tf/loadBalancerIPs",
];
pub const ADDRESS_POOL_ALIASES: [&str; 3] = [
    ADDRESS_POOL,
    "metallb.io/address-pool",
    "metallb.universe.tf/address-pool",
];
pub const ALLOW_SHARED_IP_ALIASES: [&str; 3] = [
    ALLOW_SHARED_IP,
    "metallb.io/allow-shared-ip",
    "metallb.universe.tf/allow-shared-ip",
];

/// The value of the first spelling present, with the spelling found (for messages).
pub fn lookup<'a>(
    annotations: &'a BTreeMap<String, String>,
    aliases: &[&'static str],
) -> Option<(&'static str, &'a str)> {
    aliases
        .iter()
        .find_map(|name| annotations.get(*name).map(|v| (*name, v.as_str())))
}

/// The `loadBalancerClass` ferrolb answers to besides "no class at all".
pub const LOAD_BALANCER_CLASS: &str = "ferrolb.io/lb";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ferrolb_spelling_wins_over_metallb() {
        let a: BTreeMap<String, String> = [
            ("metallb.universe.tf/address-pool", "old"),
            ("ferrolb.io/address-pool", "new"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        assert_eq!(
            lookup(&a, &ADDRESS_POOL_ALIASES),
            Some((ADDRESS_POOL, "new"))
        );
    }

    #[test]
    fn metallb_spelling_is_honoured_alone() {
        let a: BTreeMap<String, String> =
            [("metallb.io/allow-shared-ip".to_string(), "k".to_string())].into();
        assert_eq!(
            lookup(&a, &ALLOW_SHARED_IP_ALIASES),
            Some(("metallb.io/allow-shared-ip", "k"))
        );
    }
}
