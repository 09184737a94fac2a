//! Replay protection: each sender numbers its datagrams (a random incarnation per
//! process, then a counter), and a receiver accepts each number once, within a sliding
//! window, as IPsec does (RFC 4303 §3.4.3). A captured datagram replayed later is a
//! duplicate or too old, so it can neither fake a dead node's liveness nor repeat
//! a stale word about another node.
//!
//! * A sender that restarted has a new random incarnation: its counter starts a new
//!   window, and the old incarnation's window is kept, so replays of the old process's
//!   datagrams stay rejected.
//! * A receiver that restarted knows no window: it accepts the first datagram of each
//!   sender and slides from there. What it could then be fed again is bounded: foca
//!   only takes a message addressed to the receiver's current identity (its random
//!   epoch is new), except announcements, and the sender's own traffic moves the window
//!   past any recording within a probe period.
//! * A datagram names its destination, so one captured on its way to a node cannot be
//!   replayed to another (checked in the driver).
//! * [`Freshness::verdict`] runs before the tag is checked (replays cost no
//!   cryptography); [`Freshness::accept`] after it, so only authentic datagrams move
//!   a window.
//! * Pure: no clock and no I/O; memory bounded per sender and in senders.

use std::collections::HashMap;

/// Datagrams that may arrive out of order and still be accepted: a 64-bit window.
const WINDOW: u64 = 64;
/// Incarnations remembered per sender name (the newest ones).
const INCARNATIONS: usize = 4;
/// Senders remembered; only authenticated datagrams reach here, so this bounds what a
/// peer holding a key could make us keep.
const MAX_SENDERS: usize = 4096;

/// Whether a datagram is new.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Fresh,
    /// Seen already.
    Duplicate,
    /// Older than the window.
    Stale,
    /// Too many senders already known: refused rather than forgetting one.
    Full,
}

#[derive(Clone, Debug)]
struct Window {
    incarnation: u64,
    highest: u64,
    /// Bit `i` set: `highest - i` was seen.
    seen: u64,
    /// When this window last accepted something (a sequence number, not a clock).
    used: u64,
}

/// The freshness state of every sender, by (hashed) name.
#[derive(Default)]
pub(super) struct Freshness {
    senders: HashMap<u64, Vec<Window>>,
    accepted: u64,
}

impl Freshness {
    /// Whether datagram `counter` of `sender`'s process `incarnation` would be fresh,
    /// remembering nothing: checked before the tag, so that replays cost no
    /// cryptography, while only an authenticated datagram moves the window.
    pub(super) fn verdict(&self, sender: u64, incarnation: u64, counter: u64) -> Verdict {
        let Some(windows) = self.senders.get(&sender) else {
            return if self.senders.len() >= MAX_SENDERS {
                Verdict::Full
            } else {
                Verdict::Fresh
            };
        };
        let Some(window) = windows.iter().find(|w| w.incarnation == incarnation) else {
            return Verdict::Fresh;
        };
        if counter > window.highest {
            Verdict::Fresh
        } else if window.highest - counter >= WINDOW {
            Verdict::Stale
        } else if window.seen & (1 << (window.highest - counter)) != 0 {
            Verdict::Duplicate
        } else {
            Verdict::Fresh
        }
    }

    /// Checks datagram `counter` of `sender`'s process `incarnation`, and remembers it
    /// when fresh.
    pub(super) fn accept(&mut self, sender: u64, incarnation: u64, counter: u64) -> Verdict {
        if !self.senders.contains_key(&sender) && self.senders.len() >= MAX_SENDERS {
            return Verdict::Full;
        }
        self.accepted += 1;
        let used = self.accepted;
        let windows = self.senders.entry(sender).or_default();
        let Some(window) = windows.iter_mut().find(|w| w.incarnation == incarnation) else {
            if windows.len() >= INCARNATIONS
                && let Some(oldest) = windows
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, w)| w.used)
                    .map(|(i, _)| i)
            {
                windows.swap_remove(oldest);
            }
            windows.push(Window {
                incarnation,
                highest: counter,
                seen: 1,
                used,
            });
            return Verdict::Fresh;
        };
        let verdict = if counter > window.highest {
            let shift = counter - window.highest;
            window.seen = if shift >= WINDOW {
                1
            } else {
                (window.seen << shift) | 1
            };
            window.highest = counter;
            Verdict::Fresh
        } else {
            let age = window.highest - counter;
            if age >= WINDOW {
                Verdict::Stale
            } else if window.seen & (1 << age) != 0 {
                Verdict::Duplicate
            } else {
                window.seen |= 1 << age;
                Verdict::Fresh
            }
        };
        if verdict == Verdict::Fresh {
            window.used = used;
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 1;
    const B: u64 = 2;

    #[test]
    fn the_verdict_remembers_nothing_and_agrees_with_accept() {
        let mut f = Freshness::default();
        assert_eq!(f.verdict(A, 1, 5), Verdict::Fresh);
        assert_eq!(f.verdict(A, 1, 5), Verdict::Fresh, "nothing remembered");
        assert_eq!(f.accept(A, 1, 5), Verdict::Fresh);
        assert_eq!(f.verdict(A, 1, 5), Verdict::Duplicate);
        assert_eq!(f.verdict(A, 2, 5), Verdict::Fresh, "another incarnation");
        f.accept(A, 1, 200);
        assert_eq!(f.verdict(A, 1, 5), Verdict::Stale);
        assert_eq!(f.verdict(A, 1, 199), Verdict::Fresh);
    }

    #[test]
    fn each_number_is_accepted_once() {
        let mut f = Freshness::default();
        assert_eq!(f.accept(A, 1, 1), Verdict::Fresh);
        assert_eq!(f.accept(A, 1, 2), Verdict::Fresh);
        assert_eq!(f.accept(A, 1, 2), Verdict::Duplicate);
        assert_eq!(f.accept(A, 1, 1), Verdict::Duplicate);
        // Another sender has its own numbers.
        assert_eq!(f.accept(B, 1, 2), Verdict::Fresh);
    }

    #[test]
    fn reordering_within_the_window_is_accepted_and_older_is_stale() {
        let mut f = Freshness::default();
        assert_eq!(f.accept(A, 1, 100), Verdict::Fresh);
        assert_eq!(f.accept(A, 1, 90), Verdict::Fresh, "late but in the window");
        assert_eq!(f.accept(A, 1, 90), Verdict::Duplicate);
        assert_eq!(
            f.accept(A, 1, 100 - 63),
            Verdict::Fresh,
            "the window's edge"
        );
        assert_eq!(f.accept(A, 1, 100 - 64), Verdict::Stale);
        // A jump past the window forgets what was seen before it.
        assert_eq!(f.accept(A, 1, 1000), Verdict::Fresh);
        assert_eq!(f.accept(A, 1, 100), Verdict::Stale);
        assert_eq!(f.accept(A, 1, 999), Verdict::Fresh);
        assert_eq!(f.accept(A, 1, 1000), Verdict::Duplicate);
    }

    #[test]
    fn a_restarted_sender_starts_a_new_window_and_its_old_process_stays_replay_proof() {
        let mut f = Freshness::default();
        for n in 1..=50 {
            assert_eq!(f.accept(A, 7, n), Verdict::Fresh);
        }
        // The restart: a new random incarnation, counting from 1 again.
        assert_eq!(f.accept(A, 9, 1), Verdict::Fresh);
        assert_eq!(f.accept(A, 9, 2), Verdict::Fresh);
        // The old process's datagrams, replayed: refused.
        for n in 1..=50 {
            assert_ne!(f.accept(A, 7, n), Verdict::Fresh, "replay of {n}");
        }
        assert_eq!(f.accept(A, 9, 3), Verdict::Fresh);
    }

    #[test]
    fn memory_is_bounded_in_incarnations_and_senders() {
        let mut f = Freshness::default();
        for incarnation in 0..100 {
            f.accept(A, incarnation, 1);
        }
        assert_eq!(f.senders[&A].len(), INCARNATIONS);
        // The newest ones are kept.
        assert_eq!(f.accept(A, 99, 1), Verdict::Duplicate);
        for i in 0..MAX_SENDERS {
            f.accept(1000 + i as u64, 1, 1);
        }
        assert_eq!(f.accept(u64::MAX, 1, 1), Verdict::Full);
        assert_eq!(f.accept(A, 99, 2), Verdict::Fresh, "known senders go on");
    }
}
