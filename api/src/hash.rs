//! A hash fixed by this crate, not by the compiler: FNV-1a over the parts (separated by
//! a 0xff byte, which never occurs in UTF-8 text), finished with the splitmix64 mixer.
//!
//! Every node must compute the same owners and the same addresses from the same input,
//! across builds and versions, and std's hashers promise no such thing.

/// 64 bits of the parts.
pub fn stable_hash64(parts: &[&[u8]]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut h = OFFSET;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            h = (h ^ 0xff).wrapping_mul(PRIME);
        }
        for b in *part {
            h = (h ^ u64::from(*b)).wrapping_mul(PRIME);
        }
    }
    splitmix64(h)
}

/// 128 bits of the parts, for positions in IPv6 pools larger than 2^64.
pub fn stable_hash128(parts: &[&[u8]]) -> u128 {
    let high = stable_hash64(parts);
    let low = splitmix64(high ^ 0x5bd1_e995_5bd1_e995);
    (u128::from(high) << 64) | u128::from(low)
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values computed outside Rust (a few lines of Python); a change here would make
    /// nodes of two versions disagree during a rolling upgrade.
    #[test]
    fn values_are_pinned() {
        let ip = [192u8, 0, 2, 200];
        assert_eq!(stable_hash64(&[&ip, b"node-a"]), 0xf546_26be_5d36_916a);
        assert_eq!(stable_hash64(&[&ip, b"node-b"]), 0x14b5_4569_f9ba_8306);
    }

    #[test]
    fn the_separator_keeps_parts_apart() {
        assert_ne!(stable_hash64(&[b"ab", b"c"]), stable_hash64(&[b"a", b"bc"]));
    }
}
