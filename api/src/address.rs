//! Pool address syntax: CIDRs, `a-b` ranges and single IPs, IPv4 and IPv6.
//!
//! Addresses are kept as `u128` inside a [`Family`] so that range arithmetic is the same
//! for both families and never walks an address space. An IPv4 address occupies the low
//! 32 bits.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// An IP family. Ordered IPv4 first, which is also the default family of a Service
/// that names none.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
pub enum Family {
    #[serde(rename = "IPv4")]
    V4,
    #[serde(rename = "IPv6")]
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The spelling Kubernetes uses in `spec.ipFamilies`.
    pub fn as_kubernetes(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn from_kubernetes(s: &str) -> Option<Family> {
        match s {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_kubernetes())
    }
}

/// An address as a number within its family.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The inverse of [`to_u128`]. IPv4 values above `u32::MAX` cannot come from a valid
/// range, so they are truncated rather than checked.
pub fn from_u128(family: Family, n: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// Whether an IPv4 address ends in `.0` or `.255`, which some old network stacks treat
/// as network or broadcast addresses even inside a larger subnet (`avoidBuggyIPs`).
pub fn is_buggy(family: Family, n: u128) -> bool {
    family == Family::V4 && matches!(n & 0xff, 0 | 0xff)
}

/// How many addresses of `[first, last]` end in `.0` or `.255` (IPv4 only).
pub fn buggy_count(family: Family, first: u128, last: u128) -> u128 {
    if family == Family::V6 {
        return 0;
    }
    // Count of n <= x with n % 256 == r, for x >= 0.
    let upto = |x: u128, r: u128| if x < r { 0 } else { (x - r) / 256 + 1 };
    let below = |x: u128, r: u128| if x == 0 { 0 } else { upto(x - 1, r) };
    [0u128, 255]
        .iter()
        .map(|&r| upto(last, r) - below(first, r))
        .sum()
}

/// An inclusive range of addresses of one family: what one `spec.addresses` entry means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddressRange {
    family: Family,
    first: u128,
    last: u128,
}

impl AddressRange {
    /// A range from two addresses of the same family, `first <= last`.
    pub fn new(first: IpAddr, last: IpAddr) -> Option<AddressRange> {
        let family = Family::of(first);
        (family == Family::of(last) && to_u128(first) <= to_u128(last)).then(|| AddressRange {
            family,
            first: to_u128(first),
            last: to_u128(last),
        })
    }

    pub fn single(ip: IpAddr) -> AddressRange {
        AddressRange {
            family: Family::of(ip),
            first: to_u128(ip),
            last: to_u128(ip),
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }
    pub fn first(&self) -> u128 {
        self.first
    }
    pub fn last(&self) -> u128 {
        self.last
    }
    pub fn first_ip(&self) -> IpAddr {
        from_u128(self.family, self.first)
    }
    pub fn last_ip(&self) -> IpAddr {
        from_u128(self.family, self.last)
    }

    /// The number of addresses. A range never spans a whole family (parsing refuses
    /// `/0`), so this cannot overflow.
    pub fn size(&self) -> u128 {
        self.last - self.first + 1
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family && (self.first..=self.last).contains(&to_u128(ip))
    }

    /// The addresses both ranges hold, if any.
    pub fn intersection(&self, other: &AddressRange) -> Option<AddressRange> {
        let first = self.first.max(other.first);
        let last = self.last.min(other.last);
        (self.family == other.family && first <= last).then_some(AddressRange {
            family: self.family,
            first,
            last,
        })
    }
}

impl fmt::Display for AddressRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first_ip())
        } else {
            write!(f, "{}-{}", self.first_ip(), self.last_ip())
        }
    }
}

/// The longest `spec.addresses` entry the CRD accepts.
pub const MAX_ENTRY_LEN: usize = 100;

/// Why one `spec.addresses` entry is not usable. Each message quotes the entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error(
        "{input:?} is not an IP address, a CIDR (192.168.10.0/24) or a range (192.168.10.10-192.168.10.20)"
    )]
    Malformed { input: String },
    #[error("{input:?} has spaces around it; write {trimmed:?}")]
    Spaces { input: String, trimmed: String },
    #[error("{input:?} gives a netmask; write the prefix length: {suggestion:?}")]
    Netmask { input: String, suggestion: String },
    #[error("{input:?} is an IPv4-mapped IPv6 address; write the IPv4 address {ipv4:?}")]
    Ipv4Mapped { input: String, ipv4: String },
    #[error("{input:?} is longer than {MAX_ENTRY_LEN} characters")]
    TooLong { input: String },
    #[error("{input:?} has host bits set; did you mean {suggestion:?}?")]
    HostBitsSet { input: String, suggestion: String },
    #[error(
        "{input:?} covers the whole address family; name the subnet the load balancer IPs come from"
    )]
    WholeFamily { input: String },
    #[error("{input:?} ends below its start")]
    Reversed { input: String },
    #[error("{input:?} mixes an IPv4 and an IPv6 address")]
    MixedFamilies { input: String },
}

/// Parses one `spec.addresses` entry, accepting exactly what the CRD's rules accept
/// (Kubernetes' `isIP`/`isCIDR`: no spaces around an IP or CIDR, a prefix length and
/// not a netmask, no IPv4-mapped IPv6), so `ferrolb plan` never passes what
/// `kubectl apply` refuses. Only reversed ranges, which CEL cannot compare, are refused
/// here alone.
///
/// A CIDR with host bits set (`192.168.10.5/24`) is refused rather than silently
/// widened: it is almost always a typo for a single address or a smaller range, and
/// guessing would hand out addresses the user never meant to give away.
pub fn parse_range(input: &str) -> Result<AddressRange, AddressError> {
    let malformed = || AddressError::Malformed {
        input: input.to_string(),
    };
    if input.chars().count() > MAX_ENTRY_LEN {
        return Err(AddressError::TooLong {
            input: input.to_string(),
        });
    }
    if let Some((a, b)) = input.split_once('-') {
        // The CRD's rule trims each side of a range, so spaces are fine here.
        let a = parse_ip(input, a.trim())?;
        let b = parse_ip(input, b.trim())?;
        if Family::of(a) != Family::of(b) {
            return Err(AddressError::MixedFamilies {
                input: input.to_string(),
            });
        }
        return AddressRange::new(a, b).ok_or_else(|| AddressError::Reversed {
            input: input.to_string(),
        });
    }
    let trimmed = input.trim();
    if trimmed != input {
        return match parse_range(trimmed) {
            Ok(_) => Err(AddressError::Spaces {
                input: input.to_string(),
                trimmed: trimmed.to_string(),
            }),
            Err(_) => Err(malformed()),
        };
    }
    let Some((addr, bits)) = input.rsplit_once('/') else {
        return parse_ip(input, input).map(AddressRange::single);
    };
    let ip = parse_ip(input, addr)?;
    let max = match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    };
    // Digits only, no sign or leading zero, as Go's netip.ParsePrefix reads them.
    let prefix = match bits.parse::<u8>() {
        Ok(p)
            if bits.bytes().all(|b| b.is_ascii_digit())
                && (bits == "0" || !bits.starts_with('0'))
                && p <= max =>
        {
            p
        }
        _ => {
            let Ok(mask) = bits.parse::<Ipv4Addr>() else {
                return Err(malformed());
            };
            let mask = u32::from(mask);
            if !ip.is_ipv4() || mask.leading_ones() + mask.trailing_zeros() != 32 {
                return Err(malformed());
            }
            return Err(AddressError::Netmask {
                input: input.to_string(),
                suggestion: format!("{addr}/{}", mask.leading_ones()),
            });
        }
    };
    if prefix == 0 {
        return Err(AddressError::WholeFamily {
            input: input.to_string(),
        });
    }
    let net = IpNetwork::new(ip, prefix).map_err(|_| malformed())?;
    if net.ip() != net.network() {
        return Err(AddressError::HostBitsSet {
            input: input.to_string(),
            suggestion: format!("{}/{}", net.network(), net.prefix()),
        });
    }
    let first = net.network();
    let last = match net {
        IpNetwork::V4(n) => IpAddr::V4(n.broadcast()),
        IpNetwork::V6(n) => IpAddr::V6(n.broadcast()),
    };
    Ok(AddressRange::new(first, last).expect("network precedes broadcast"))
}

/// One address of the entry `input`, as Kubernetes' `isIP` reads it.
fn parse_ip(input: &str, s: &str) -> Result<IpAddr, AddressError> {
    let ip: IpAddr = s.parse().map_err(|_| AddressError::Malformed {
        input: input.to_string(),
    })?;
    if let IpAddr::V6(v6) = ip
        && let Some(v4) = v6.to_ipv4_mapped()
    {
        return Err(AddressError::Ipv4Mapped {
            input: input.to_string(),
            ipv4: v4.to_string(),
        });
    }
    Ok(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_three_shapes_in_both_families() {
        let r = parse_range("192.168.10.0/24").unwrap();
        assert_eq!(
            (r.first_ip(), r.last_ip()),
            (ip("192.168.10.0"), ip("192.168.10.255"))
        );
        let r = parse_range("fd00::/120").unwrap();
        assert_eq!((r.first_ip(), r.last_ip()), (ip("fd00::"), ip("fd00::ff")));
        let r = parse_range("192.168.10.10 - 192.168.10.20").unwrap();
        assert_eq!(r.size(), 11);
        let r = parse_range("fd00::10-fd00::1:0").unwrap();
        assert_eq!(r.size(), 0x1_0000 - 0x10 + 1);
        assert_eq!(parse_range("10.0.0.7").unwrap().size(), 1);
        assert_eq!(parse_range("10.0.0.7/32").unwrap().size(), 1);
        assert_eq!(parse_range("fd00::7/128").unwrap().size(), 1);
        assert_eq!(parse_range("fd00::7").unwrap().family(), Family::V6);
    }

    #[test]
    fn a_slash_one_is_the_largest_pool_and_its_size_fits() {
        assert_eq!(parse_range("8000::/1").unwrap().size(), 1u128 << 127);
    }

    #[test]
    fn refuses_bad_entries_quoting_them() {
        let cases = [
            ("192.168.10.0/33", "is not an IP address"),
            ("banana", "is not an IP address"),
            ("10.0.0.1-", "is not an IP address"),
            ("192.168.10.5/24", "did you mean \"192.168.10.0/24\""),
            ("fd00::1/120", "did you mean \"fd00::/120\""),
            ("0.0.0.0/0", "covers the whole address family"),
            ("10.0.0.9-10.0.0.1", "ends below its start"),
            ("10.0.0.1-fd00::1", "mixes an IPv4 and an IPv6 address"),
        ];
        for (input, want) in cases {
            let err = parse_range(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
            assert!(err.contains(&format!("{input:?}")), "{input}: {err}");
        }
    }

    #[test]
    fn refuses_what_the_api_server_refuses_with_a_hint() {
        let cases = [
            (" 10.0.0.1", "has spaces around it; write \"10.0.0.1\""),
            (
                "10.0.0.0/24 ",
                "has spaces around it; write \"10.0.0.0/24\"",
            ),
            (
                "192.0.2.0/255.255.255.0",
                "write the prefix length: \"192.0.2.0/24\"",
            ),
            ("192.0.2.0/255.0.255.0", "is not an IP address"),
            ("192.0.2.0/024", "is not an IP address"),
            ("192.0.2.0/+24", "is not an IP address"),
            ("::ffff:10.0.0.1", "write the IPv4 address \"10.0.0.1\""),
            ("10.0.0.1-::ffff:10.0.0.9", "IPv4-mapped"),
            ("fe80::1%eth0", "is not an IP address"),
            ("010.0.0.1", "is not an IP address"),
        ];
        for (input, want) in cases {
            let err = parse_range(input).unwrap_err().to_string();
            assert!(err.contains(want), "{input}: {err}");
        }
        let long = format!("10.0.0.1{}-10.0.0.2", " ".repeat(MAX_ENTRY_LEN));
        assert!(
            parse_range(&long)
                .unwrap_err()
                .to_string()
                .contains("longer than 100")
        );
        // The CRD trims around the dash of a range, and so does this.
        assert_eq!(parse_range(" 10.0.0.1 - 10.0.0.2 ").unwrap().size(), 2);
    }

    #[test]
    fn buggy_count_matches_a_walk() {
        for (first, last) in [
            (0u128, 0u128),
            (0, 255),
            (1, 254),
            (255, 256),
            (250, 1030),
            (256, 511),
        ] {
            let walk = (first..=last).filter(|&n| is_buggy(Family::V4, n)).count() as u128;
            assert_eq!(
                buggy_count(Family::V4, first, last),
                walk,
                "{first}..={last}"
            );
        }
        assert_eq!(buggy_count(Family::V6, 0, 1 << 100), 0);
    }
}
