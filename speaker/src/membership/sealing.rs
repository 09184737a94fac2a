//! Membership datagrams on the wire.
//!
//! ```text
//! plain:  [1] [header] [foca message]
//! sealed: [3] [key id: 4] [header] [nonce: 12] ChaCha20-Poly1305([foca message]) [tag: 16]
//! header: [sender: 8] [destination: 8] [incarnation: 8] [counter: 8]
//!         [floor bump: 8] [floor epoch: 8]                  (names as 8-byte hashes)
//! ```
//!
//! The checks run cheapest first, so that junk, forgeries and replays cost a few
//! comparisons: kind byte and length, the key id (a lookup among a handful of keys, no
//! trial decryption), the header (in clear, like IPsec's sequence number, so that a
//! datagram for another node or a replay is refused before any cryptography), then the
//! tag, which covers the kind, key id and header as associated data: nobody without a
//! key can forge the sender, its incarnation or its counter. Freshness is remembered
//! only once the tag verified (see `freshness`).

use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};

/// Largest datagram we send: below any Ethernet MTU, so never fragmented.
pub(super) const MAX_DATAGRAM: usize = 1400;
/// The freshness header before the foca message.
pub(super) const HEADER: usize = 8 * 6;
/// Frame overhead when sealed: kind byte, key id, nonce, Poly1305 tag.
pub(super) const SEALED_OVERHEAD: usize = 1 + 4 + 12 + 16;
/// Where the header starts in a sealed frame (after kind and key id).
const SEALED_HEADER_AT: usize = 1 + 4;
/// What foca may put in one datagram.
pub(super) const MAX_FOCA_PACKET: usize = MAX_DATAGRAM - SEALED_OVERHEAD - HEADER;
/// First byte of a plain datagram (no secret configured).
const KIND_PLAIN: u8 = 1;
/// First byte of a sealed datagram. (2 was the sealed framing without a key id or a
/// freshness header, before replays were rejected; it is not accepted.)
const KIND_SEALED: u8 = 3;
/// Most keys a keyring holds: one sends, the others are accepted while a rotation rolls.
pub const MAX_KEYS: usize = 8;
/// Shortest key accepted: the chart generates 64 characters.
pub const MIN_KEY_BYTES: usize = 8;

/// One key of a keyring.
#[derive(Clone)]
struct SealingKey {
    id: [u8; 4],
    cipher: ChaCha20Poly1305,
}

/// The keys membership datagrams are sealed with: the first seals what we send, every
/// one opens what we receive, so a key can be rotated without splitting the cluster.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<SealingKey>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Key ids only: they identify a key without revealing it.
        f.debug_list()
            .entries(self.keys.iter().map(|k| hex(&k.id)))
            .finish()
    }
}

impl PartialEq for Keyring {
    fn eq(&self, other: &Self) -> bool {
        self.ids() == other.ids()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Keyring {
    /// A keyring from the contents of a keyring file: one key per line, the first
    /// sends; blank lines and surrounding whitespace are ignored.
    pub fn parse(contents: &[u8]) -> anyhow::Result<Keyring> {
        let mut keys = Vec::new();
        for (i, line) in contents.split(|b| *b == b'\n').enumerate() {
            let key = line.trim_ascii();
            if key.is_empty() {
                continue;
            }
            anyhow::ensure!(
                key.len() >= MIN_KEY_BYTES,
                "line {}: a key of {} bytes is too short (at least {MIN_KEY_BYTES})",
                i + 1,
                key.len()
            );
            keys.push(key);
        }
        anyhow::ensure!(!keys.is_empty(), "no key in it (one key per line)");
        anyhow::ensure!(
            keys.len() <= MAX_KEYS,
            "{} keys; at most {MAX_KEYS} (one sends, the others are accepted during a rotation)",
            keys.len()
        );
        Ok(Keyring::from_keys(&keys))
    }

    /// A keyring of these keys, the first sending.
    pub fn from_keys(keys: &[&[u8]]) -> Keyring {
        let mut ring = Keyring { keys: Vec::new() };
        for key in keys {
            let derived = derive(b"ferrolb membership key v2\0", key);
            let id = derive(b"ferrolb membership key id v2\0", key);
            let id = [id[0], id[1], id[2], id[3]];
            if ring.keys.iter().any(|k| k.id == id) {
                continue;
            }
            ring.keys.push(SealingKey {
                id,
                cipher: ChaCha20Poly1305::new(&Key::from(derived)),
            });
        }
        ring
    }

    /// The key ids, sending key first (hex; safe to log).
    pub fn ids(&self) -> Vec<String> {
        self.keys.iter().map(|k| hex(&k.id)).collect()
    }
}

/// A node name as the header carries it: 8 bytes whatever the name's length (names
/// are up to 253 bytes), so the header is small and fixed. Only peers holding a key
/// write headers, so a collision is no attack.
pub(super) fn name_hash(name: &str) -> u64 {
    let hash = derive(b"ferrolb membership name\0", name.as_bytes());
    u64::from_le_bytes([
        hash[0], hash[1], hash[2], hash[3], hash[4], hash[5], hash[6], hash[7],
    ])
}

fn derive(context: &[u8], key: &[u8]) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(context);
    hash.update(key);
    hash.finalize().into()
}

/// Who sent a datagram, and how fresh it is; inside the seal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Header {
    /// The sender's name (its Node's), hashed ([`name_hash`]).
    pub(super) sender: u64,
    /// The name of the node it is for, hashed: a datagram replayed to another node is
    /// refused there, whatever its freshness.
    pub(super) destination: u64,
    /// Random, per sender process: a restart starts a new counter.
    pub(super) incarnation: u64,
    /// Counts the sender's datagrams (all destinations), from 1.
    pub(super) counter: u64,
    /// The newest identity of the destination's name the sender knows: (bump, epoch).
    /// A restarted node whose new identity is older than that learns to outbid it.
    pub(super) floor: (u64, u64),
}

impl Header {
    fn write(&self, out: &mut Vec<u8>) {
        for field in [
            self.sender,
            self.destination,
            self.incarnation,
            self.counter,
            self.floor.0,
            self.floor.1,
        ] {
            out.extend_from_slice(&field.to_le_bytes());
        }
    }

    fn read(data: &[u8]) -> Option<Header> {
        let u64_at = |i: usize| -> Option<u64> {
            Some(u64::from_le_bytes(data.get(i..i + 8)?.try_into().ok()?))
        };
        let header = Header {
            sender: u64_at(0)?,
            destination: u64_at(8)?,
            incarnation: u64_at(16)?,
            counter: u64_at(24)?,
            floor: (u64_at(32)?, u64_at(40)?),
        };
        Some(header)
    }
}

/// Why a datagram was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rejected {
    /// Not our framing (unknown kind, too short or too long, a header that does not
    /// parse): junk.
    Malformed,
    /// Sealed with a key not in our keyring, or plain when we have one (or the reverse).
    UnknownKey,
    /// The tag does not verify: forged or damaged.
    Forged,
}

/// Frames a foca message for the wire: sealed with the sending key and a fresh random
/// nonce when there is a keyring. `None` only if the system RNG fails.
pub(super) fn seal(keyring: Option<&Keyring>, header: &Header, message: &[u8]) -> Option<Vec<u8>> {
    let Some(key) = keyring.and_then(|k| k.keys.first()) else {
        let mut frame = Vec::with_capacity(1 + HEADER + message.len());
        frame.push(KIND_PLAIN);
        header.write(&mut frame);
        frame.extend_from_slice(message);
        return Some(frame);
    };
    let mut frame = Vec::with_capacity(SEALED_OVERHEAD + HEADER + message.len());
    frame.push(KIND_SEALED);
    frame.extend_from_slice(&key.id);
    header.write(&mut frame);
    let nonce = Nonce::try_generate().ok()?;
    let sealed = key
        .cipher
        .encrypt(
            &nonce,
            Payload {
                msg: message,
                aad: &frame,
            },
        )
        .ok()?;
    frame.extend_from_slice(&nonce);
    frame.extend_from_slice(&sealed);
    Some(frame)
}

/// A datagram whose framing, key and header were checked, but not yet its tag.
pub(super) struct Unopened<'a> {
    pub(super) header: Header,
    frame: &'a [u8],
    key: Option<&'a SealingKey>,
}

/// The cheap checks, no cryptography: framing, length, key id, header.
pub(super) fn peek<'a>(
    keyring: Option<&'a Keyring>,
    frame: &'a [u8],
) -> Result<Unopened<'a>, Rejected> {
    if frame.len() > MAX_DATAGRAM {
        return Err(Rejected::Malformed);
    }
    let (key, header_at) = match (keyring, frame.first()) {
        (None, Some(&KIND_PLAIN)) => (None, 1),
        (Some(_), Some(&KIND_PLAIN)) | (None, Some(&KIND_SEALED)) => {
            return Err(Rejected::UnknownKey);
        }
        (Some(keyring), Some(&KIND_SEALED)) if frame.len() >= SEALED_OVERHEAD + HEADER => {
            let id = &frame[1..SEALED_HEADER_AT];
            let key = keyring
                .keys
                .iter()
                .find(|k| k.id == id)
                .ok_or(Rejected::UnknownKey)?;
            (Some(key), SEALED_HEADER_AT)
        }
        _ => return Err(Rejected::Malformed),
    };
    let header = Header::read(&frame[header_at..]).ok_or(Rejected::Malformed)?;
    Ok(Unopened { header, frame, key })
}

impl Unopened<'_> {
    /// Verifies the tag and decrypts: the foca message.
    pub(super) fn open(self) -> Result<Vec<u8>, Rejected> {
        let Some(key) = self.key else {
            return Ok(self.frame[1 + HEADER..].to_vec());
        };
        let (aad, rest) = self.frame.split_at(SEALED_HEADER_AT + HEADER);
        let (nonce, sealed) = rest.split_at(12);
        let nonce = Nonce::try_from(nonce).map_err(|_| Rejected::Malformed)?;
        key.cipher
            .decrypt(&nonce, Payload { msg: sealed, aad })
            .map_err(|_| Rejected::Forged)
    }
}

/// [`peek`] then [`Unopened::open`]: the header and foca message in a datagram.
#[cfg(test)]
fn open(keyring: Option<&Keyring>, frame: &[u8]) -> Result<(Header, Vec<u8>), Rejected> {
    let unopened = peek(keyring, frame)?;
    let header = unopened.header.clone();
    Ok((header, unopened.open()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[&str]) -> Keyring {
        let keys: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        Keyring::from_keys(&keys)
    }

    fn header() -> Header {
        Header {
            sender: name_hash("node-a"),
            destination: name_hash("node-b"),
            incarnation: 7,
            counter: 42,
            floor: (3, 9),
        }
    }

    #[test]
    fn sealed_frames_open_only_with_a_key_of_the_ring() {
        let right = ring(&["s3cret-key"]);
        let frame = seal(Some(&right), &header(), b"hello").expect("sealed");
        assert_eq!(
            open(Some(&right), &frame),
            Ok((header(), b"hello".to_vec()))
        );
        assert_eq!(
            open(Some(&ring(&["other-key"])), &frame),
            Err(Rejected::UnknownKey)
        );
        assert_eq!(
            open(None, &frame),
            Err(Rejected::UnknownKey),
            "no keyring must not accept sealed"
        );
        let plain = seal(None, &header(), b"hello").expect("plain");
        assert_eq!(
            open(Some(&right), &plain),
            Err(Rejected::UnknownKey),
            "a keyring must not accept plain"
        );
        assert_eq!(open(None, &plain), Ok((header(), b"hello".to_vec())));
    }

    #[test]
    fn a_rotating_ring_sends_with_its_first_key_and_accepts_all() {
        let old = ring(&["old-key-1"]);
        let both = ring(&["new-key-2", "old-key-1"]);
        let new = ring(&["new-key-2"]);
        let from_old = seal(Some(&old), &header(), b"m").expect("sealed");
        let from_both = seal(Some(&both), &header(), b"m").expect("sealed");
        assert!(
            open(Some(&both), &from_old).is_ok(),
            "[new, old] accepts old"
        );
        assert!(open(Some(&new), &from_both).is_ok(), "[new, old] sends new");
        assert!(
            open(Some(&old), &from_both).is_err(),
            "old does not know new"
        );
    }

    #[test]
    fn tampered_short_or_oversized_frames_are_rejected() {
        let r = ring(&["k-long-enough"]);
        let mut frame = seal(Some(&r), &header(), b"payload").expect("sealed");
        let last = frame.len() - 1;
        frame[last] ^= 1;
        assert_eq!(open(Some(&r), &frame), Err(Rejected::Forged));
        let mut id = seal(Some(&r), &header(), b"payload").expect("sealed");
        id[1] ^= 1;
        assert_eq!(open(Some(&r), &id), Err(Rejected::UnknownKey));
        // The header is in clear but authenticated: a changed counter does not verify.
        let mut counter = seal(Some(&r), &header(), b"payload").expect("sealed");
        counter[SEALED_HEADER_AT + 24] ^= 1;
        assert_eq!(open(Some(&r), &counter), Err(Rejected::Forged));
        assert_eq!(
            open(Some(&r), &[KIND_SEALED, 1, 2]),
            Err(Rejected::Malformed)
        );
        assert_eq!(open(Some(&r), &[]), Err(Rejected::Malformed));
        assert_eq!(open(None, &[]), Err(Rejected::Malformed));
        assert_eq!(open(None, &[KIND_PLAIN, 1, 2]), Err(Rejected::Malformed));
        let big = vec![KIND_PLAIN; MAX_DATAGRAM + 1];
        assert_eq!(open(None, &big), Err(Rejected::Malformed));
    }

    proptest::proptest! {
        /// Whatever reaches the membership port: no panic, and nothing opens under a
        /// keyring unless it was sealed with one of its keys.
        #[test]
        fn arbitrary_datagrams_never_open_under_a_keyring(
            frame in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..MAX_DATAGRAM + 64),
            kind in proptest::prop_oneof![proptest::prelude::Just(KIND_SEALED), proptest::prelude::Just(KIND_PLAIN)],
        ) {
            let r = ring(&["k-long-enough"]);
            let mut frame = frame;
            if let Some(first) = frame.first_mut() {
                *first = kind;
            }
            proptest::prop_assert!(open(Some(&r), &frame).is_err());
            let _ = open(None, &frame);
        }

        /// A sealed datagram with any one byte changed, or cut short anywhere, is refused.
        #[test]
        fn a_sealed_datagram_changed_anywhere_is_refused(
            at in 0usize..256, flip in 1u8..=255, cut in 0usize..256,
        ) {
            let r = ring(&["k-long-enough"]);
            let frame = seal(Some(&r), &header(), b"a foca message").expect("sealed");
            let mut changed = frame.clone();
            let at = at % changed.len();
            changed[at] ^= flip;
            proptest::prop_assert!(open(Some(&r), &changed).is_err(), "byte {} changed", at);
            let cut = cut % frame.len();
            proptest::prop_assert!(open(Some(&r), &frame[..cut]).is_err(), "cut at {}", cut);
        }
    }

    #[test]
    fn every_frame_has_a_fresh_nonce() {
        let r = ring(&["k-long-enough"]);
        let a = seal(Some(&r), &header(), b"same").expect("sealed");
        let b = seal(Some(&r), &header(), b"same").expect("sealed");
        assert_ne!(a, b);
    }

    #[test]
    fn keyring_files_hold_one_key_per_line() {
        let r = Keyring::parse(b"new-key-2\n\n  old-key-1  \n").expect("two keys");
        assert_eq!(r, ring(&["new-key-2", "old-key-1"]));
        assert_eq!(r.ids().len(), 2);
        let e = Keyring::parse(b"\n \n").expect_err("empty");
        assert_eq!(e.to_string(), "no key in it (one key per line)");
        let e = Keyring::parse(b"good-key-1\nshort\n").expect_err("short");
        assert_eq!(
            e.to_string(),
            "line 2: a key of 5 bytes is too short (at least 8)"
        );
        let many: String = (0..9).map(|i| format!("key-number-{i}\n")).collect();
        assert!(Keyring::parse(many.as_bytes()).is_err());
        // A key id says which key without saying the key.
        assert!(!format!("{r:?}").contains("key-2"));
    }
}
