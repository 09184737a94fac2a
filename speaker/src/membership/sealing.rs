//! Membership datagrams on the wire: a kind byte, then foca's message, sealed with
//! ChaCha20-Poly1305 under a key derived from the shared secret when there is one, so
//! that nodes with different secrets (or none) never admit each other.

use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use sha2::{Digest, Sha256};

/// Largest datagram we send: below any Ethernet MTU, so never fragmented.
pub(super) const MAX_DATAGRAM: usize = 1400;
/// Frame overhead when sealed: kind byte, nonce, Poly1305 tag.
const SEALED_OVERHEAD: usize = 1 + 12 + 16;
/// What foca may put in one datagram.
pub(super) const MAX_FOCA_PACKET: usize = MAX_DATAGRAM - SEALED_OVERHEAD;
/// First byte of every datagram: plain foca message.
const KIND_PLAIN: u8 = 1;
/// First byte of every datagram: sealed with the shared secret.
const KIND_SEALED: u8 = 2;

pub(super) fn cipher_for(secret: &[u8]) -> ChaCha20Poly1305 {
    let mut hash = Sha256::new();
    hash.update(b"ferrolb membership v1\0");
    hash.update(secret);
    let key: [u8; 32] = hash.finalize().into();
    ChaCha20Poly1305::new(&Key::from(key))
}

/// Frames a foca message for the wire: sealed with a fresh random nonce when there is a
/// secret. `None` only if the system RNG fails.
pub(super) fn seal(cipher: Option<&ChaCha20Poly1305>, message: &[u8]) -> Option<Vec<u8>> {
    let Some(cipher) = cipher else {
        let mut frame = Vec::with_capacity(message.len() + 1);
        frame.push(KIND_PLAIN);
        frame.extend_from_slice(message);
        return Some(frame);
    };
    let nonce = Nonce::try_generate().ok()?;
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: message,
                aad: &[KIND_SEALED],
            },
        )
        .ok()?;
    let mut frame = Vec::with_capacity(1 + nonce.len() + sealed.len());
    frame.push(KIND_SEALED);
    frame.extend_from_slice(&nonce);
    frame.extend_from_slice(&sealed);
    Some(frame)
}

/// The foca message inside a datagram, or `None` when it is not ours to accept.
pub(super) fn open(cipher: Option<&ChaCha20Poly1305>, frame: &[u8]) -> Option<Vec<u8>> {
    match (cipher, frame.split_first()) {
        (None, Some((&KIND_PLAIN, message))) => Some(message.to_vec()),
        (Some(cipher), Some((&KIND_SEALED, rest))) if rest.len() >= 12 + 16 => {
            let (nonce, sealed) = rest.split_at(12);
            let nonce = Nonce::try_from(nonce).ok()?;
            cipher
                .decrypt(
                    &nonce,
                    Payload {
                        msg: sealed,
                        aad: &[KIND_SEALED],
                    },
                )
                .ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(secret: &[u8]) -> ChaCha20Poly1305 {
        cipher_for(secret)
    }

    #[test]
    fn sealed_frames_open_only_with_the_same_secret() {
        let right = cipher(b"s3cret");
        let frame = seal(Some(&right), b"hello").expect("sealed");
        assert_eq!(open(Some(&right), &frame).as_deref(), Some(&b"hello"[..]));
        assert_eq!(open(Some(&cipher(b"other")), &frame), None);
        assert_eq!(open(None, &frame), None, "no secret must not accept sealed");
        let plain = seal(None, b"hello").expect("plain");
        assert_eq!(
            open(Some(&right), &plain),
            None,
            "secret must not accept plain"
        );
        assert_eq!(open(None, &plain).as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn tampered_or_short_frames_are_rejected() {
        let c = cipher(b"k");
        let mut frame = seal(Some(&c), b"payload").expect("sealed");
        let last = frame.len() - 1;
        frame[last] ^= 1;
        assert_eq!(open(Some(&c), &frame), None);
        assert_eq!(open(Some(&c), &[KIND_SEALED, 1, 2]), None);
        assert_eq!(open(Some(&c), &[]), None);
        assert_eq!(open(None, &[]), None);
    }

    #[test]
    fn every_frame_has_a_fresh_nonce() {
        let c = cipher(b"k");
        let a = seal(Some(&c), b"same").expect("sealed");
        let b = seal(Some(&c), b"same").expect("sealed");
        assert_ne!(a, b);
    }
}
