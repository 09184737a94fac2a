//! ferrolb's speaker: decides which node announces each external IP and makes that
//! node answer for it on the wire.
//!
//! * [`arp`], [`ndp`]: typed views over ARP and Neighbor Discovery frames (pure; the
//!   `ferrolb-wire` crate, re-exported).
//! * [`election`]: which node owns an IP (pure).
//! * [`announcements`]: from declared objects to what this node announces (pure).
//! * [`interfaces`]: which links exist and which of them announce an IP (rtnetlink).
//! * [`kernel_arp`]: whether the node's own kernel answers ARP for VIPs it does not
//!   announce (kube-proxy IPVS mode without strictARP; pure).
//! * [`kernel_responder`]: ARP answered in the kernel by a tc program, for the IPs a
//!   link announces (user space stays the fallback).
//! * [`forwarding`]: VIP:port to NodePort DNAT in ferrolb's own nftables table.
//! * [`responder`]: per-interface tasks answering ARP/NS and announcing takeovers, over
//!   [`packet_socket`]s.
//! * [`membership`]: which speakers are alive (SWIM over UDP, foca); [`cluster`] turns
//!   it into the view election needs.
//! * [`node_network`]: which addresses a `fromNodeNetwork` pool takes (pure); [`probe`]
//!   asks the wire whether they are in use.
//! * [`proxy_health`]: whether kube-proxy on this node passes its health check, so
//!   that the node may announce (gossiped; election passes over a node that fails).
//! * [`daemon`]: the main loop, from objects to announcements, forwarding and membership.
//! * [`standalone`]: the speaker driven by a directory of manifests.
//! * [`kubernetes`]: the speaker driven by the API server, reporting which node
//!   announces each IP.
//! * [`metrics`]: what it answered, announced and owned, for Prometheus.

pub use ferrolb_wire::{arp, ndp};

pub mod announcements;
pub mod cluster;
pub mod daemon;
pub mod damping;
pub mod election;
pub mod forwarding;
pub mod interfaces;
pub mod kernel_arp;
pub mod kernel_responder;
pub mod kubernetes;
pub mod mac;
pub mod membership;
pub mod metrics;
pub mod neighbours;
pub mod node_network;
pub mod packet_socket;
pub mod probe;
pub mod proxy_health;
pub mod responder;
pub mod standalone;
