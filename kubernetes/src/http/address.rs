//! The address the metrics server binds, as written on a command line.

use std::net::{IpAddr, SocketAddr};

/// `IP:PORT`, `[IPv6]:PORT`, or an IPv6 address without brackets followed by `:PORT` —
/// what `--metrics-address=$(NODE_IP):7474` gives on an IPv6 node, where the chart
/// cannot know the family.
pub fn parse_address(text: &str) -> Result<SocketAddr, String> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(address);
    }
    let bad = || {
        format!(
            "{text:?} is not an address and port (0.0.0.0:7474, 192.0.2.1:7474, [2001:db8::1]:7474)"
        )
    };
    let (ip, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_family_with_or_without_brackets() {
        assert_eq!(
            parse_address("192.0.2.1:7474"),
            Ok(SocketAddr::from(([192, 0, 2, 1], 7474)))
        );
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            parse_address("[2001:db8::1]:7474"),
            Ok(SocketAddr::new(v6, 7474))
        );
        assert_eq!(
            parse_address("2001:db8::1:7474"),
            Ok(SocketAddr::new(v6, 7474))
        );
        for bad in [
            "",
            "7474",
            "node:7474",
            "192.0.2.1",
            "192.0.2.1:99999",
            ":7474",
        ] {
            let e = parse_address(bad).unwrap_err();
            assert!(e.contains("is not an address and port"), "{bad}: {e}");
        }
    }
}
