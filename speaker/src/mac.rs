//! MAC addresses as people read them and as `arping`, `ndisc6` and `ip` print them:
//! `02:00:00:01:00:0a`.

/// Lower case, colon-separated.
pub fn format(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Either case; `None` for anything but six colon-separated bytes.
pub fn parse(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip_in_either_case() {
        let mac = [0x02, 0, 0, 0x1f, 0, 0x0a];
        assert_eq!(format(&mac), "02:00:00:1f:00:0a");
        assert_eq!(parse("02:00:00:1F:00:0A"), Some(mac));
        for bad in [
            "",
            "02:00:00:1f:00",
            "02:00:00:1f:00:0a:00",
            "02:00:00:1f:00:xx",
            "020:0:0:0:0:0",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
