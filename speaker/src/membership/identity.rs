//! A member's identity in foca: its name, address, and what makes a restarted or renewed
//! node win over its former self — with no wall clock, which can step back across a
//! restart (a node whose new identity looked older than its last one was locked out).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A member's identity in foca. Identities of one name are ordered by (`bump`, `epoch`):
/// a renewal (declared down, rejoining) adds one to `bump`; a new process starts at
/// bump 0 with a random epoch, and when a peer still knows an identity of its name that
/// wins, the peer says so in every datagram it sends it (the floor in the sealed header)
/// and the process outbids it at once (see the driver).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub(super) struct NodeId {
    pub(super) name: String,
    pub(super) addr: SocketAddr,
    pub(super) bump: u64,
    /// Random per process, persisted nowhere (what its metadata is kept under, and its
    /// datagrams are numbered under); unchanged by renewals. Metadata of another process
    /// is not this member's. It also binds foca's messages to one process: a message
    /// addressed to a previous process of the receiver is not taken.
    pub(super) epoch: u64,
}

impl foca::Identity for NodeId {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            name: self.name.clone(),
            addr: self.addr,
            bump: self.bump.wrapping_add(1),
            epoch: self.epoch,
        })
    }

    fn addr(&self) -> String {
        self.name.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.bump, self.epoch) > (adversary.bump, adversary.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Identity as _;

    fn id(bump: u64, epoch: u64) -> NodeId {
        NodeId {
            name: "a".into(),
            addr: ([192, 0, 2, 1], 7947).into(),
            bump,
            epoch,
        }
    }

    #[test]
    fn identities_of_a_name_are_totally_ordered_and_a_renewal_wins() {
        let (old, new) = (id(0, 5), id(0, 9));
        assert!(new.win_addr_conflict(&old) && !old.win_addr_conflict(&new));
        let renewed = old.renew().expect("renews");
        assert!(renewed.win_addr_conflict(&old));
        assert!(
            renewed.win_addr_conflict(&new),
            "bump first, epoch breaks ties"
        );
        assert!(!old.win_addr_conflict(&old));
    }
}
