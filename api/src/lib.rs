//! ferrolb's API: the custom resources, the Service annotations, and the parsing and
//! validation of pool addresses that the controller and the speaker share.
//!
//! Nothing here does I/O: manifests are parsed from text the caller has read.

pub mod address;
pub mod annotations;
pub mod announcement;
pub mod crds;
pub mod hash;
pub mod l2advertisement;
pub mod manifests;
pub mod pool;
pub mod selector;
pub mod validation;

pub use address::{AddressRange, Family};
pub use announcement::{AnnouncedIP, NodeAnnouncement, NodeAnnouncementSpec, OtherResponder};
pub use l2advertisement::{
    Forwarding, Gratuitous, L2Advertisement, L2AdvertisementSpec, NodePriority,
};
pub use pool::{
    AddressEntry, FromNodeNetwork, IPAddressPool, IPAddressPoolSpec, IPAddressPoolStatus,
    NodeNetworkStatus, ServiceAllocation,
};

/// CEL for a list of selectors: no two alike (MetalLB refuses a repeat too, and a repeat
/// is always a slip).
pub const UNIQUE_RULE: &str = "self.all(x, self.exists_one(y, y == x))";
pub const UNIQUE_MESSAGE: &str = "lists the same selector twice";

/// The API group of every ferrolb resource.
pub const GROUP: &str = "ferrolb.io";
/// The served and stored version.
pub const VERSION: &str = "v1beta1";
