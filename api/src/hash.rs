//! A hash fixed by this crate, not by the compiler: FNV-1a over the parts (separated by
//! a 0xff byte, which never occurs in UTF-8 text), finished with the splitmix64 mixer.
//!
//! Every node must compute the same owners and the same addresses from the same input,
//! across builds and versions, and std's hashers promise no such thing.

/// 64 bits of the parts.
pub fn stable_hash64(parts: &[&[u8]]) -> u64 {
    parts
        .iter()
        .fold(StableHasher::default(), |h, part| h.part(part))
        .finish()
}

/// [`stable_hash64`] part by part, so that the state after shared leading parts can be
/// kept: an election scores one IP against thousands of nodes, and hashes the IP once.
#[derive(Clone, Copy, Debug)]
pub struct StableHasher {
    h: u64,
    first: bool,
}

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher {
            h: 0xcbf2_9ce4_8422_2325,
            first: true,
        }
    }
}

impl StableHasher {
    const PRIME: u64 = 0x0100_0000_01b3;

    /// The state with `part` added after the parts before it.
    #[must_use]
    pub fn part(mut self, part: &[u8]) -> StableHasher {
        if !self.first {
            self.h = (self.h ^ 0xff).wrapping_mul(Self::PRIME);
        }
        self.first = false;
        for b in part {
            self.h = (self.h ^ u64::from(*b)).wrapping_mul(Self::PRIME);
        }
        self
    }

    pub fn finish(self) -> u64 {
        splitmix64(self.h)
    }
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
    fn a_kept_state_hashes_as_the_whole() {
        let ip = StableHasher::default().part(&[192, 0, 2, 200]);
        assert_eq!(ip.part(b"node-a").finish(), 0xf546_26be_5d36_916a);
        assert_eq!(ip.part(b"node-b").finish(), 0x14b5_4569_f9ba_8306);
        assert_eq!(StableHasher::default().finish(), stable_hash64(&[]));
    }

    #[test]
    fn the_separator_keeps_parts_apart() {
        assert_ne!(stable_hash64(&[b"ab", b"c"]), stable_hash64(&[b"a", b"bc"]));
    }
}
