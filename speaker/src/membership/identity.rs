//! A member's identity in foca: its name, address, and what makes a restarted or renewed
//! node win over its former self.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// A member's identity in foca. `bump` makes a restarted or renewed node a newer
/// identity for the same name, which wins over the old one, so it is admitted at once.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub(super) struct NodeId {
    pub(super) name: String,
    pub(super) addr: SocketAddr,
    pub(super) bump: u64,
    /// The process's start (what its metadata is versioned by); unchanged by renewals.
    /// Metadata of an older process is not this member's.
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
        self.bump > adversary.bump
    }
}
