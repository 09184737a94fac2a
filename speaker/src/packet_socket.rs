//! AF_PACKET sockets bound to one interface, filtered in the kernel to the frames the
//! responder needs, under tokio's `AsyncFd`.
//!
//! Not pnet's datalink channels: those are blocking, promiscuous and see every frame.
//! Here a classic BPF program drops, before anything is copied to user space:
//!
//! * our own outgoing frames;
//! * frames not addressed to this host (`PACKET_OTHERHOST`): unicast to another MAC,
//!   and 802.1Q-tagged frames for a VLAN this interface does not terminate (with no VLAN
//!   sub-interface for the tag, the kernel strips the tag and marks the frame
//!   OTHERHOST). A request asked on VLAN 100 must not be answered untagged on the
//!   parent, where it would poison the caches of another broadcast domain; a VLAN
//!   sub-interface named in the L2Advertisement receives such frames untagged and
//!   answers them;
//! * frames that still carry a VLAN tag in their metadata (`SKF_AD_VLAN_TAG_PRESENT`);
//! * for ARP, requests and replies that name none of the IPs owned on the link
//!   ([`arp_filter_for`]), so a flood of foreign ARP costs the speaker nothing: the
//!   filter is rebuilt when ownership changes.

use std::io::{self, Read};
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use nix::libc;
use socket2::{Domain, SockAddr, SockAddrStorage, SockFilter, Socket, Type};
use tokio::io::unix::AsyncFd;

pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;

const LD_W_ABS: u16 = 0x20;
const LD_B_ABS: u16 = 0x30;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;
/// `SKF_AD_OFF + SKF_AD_PKTTYPE`: loads the packet type.
const PKTTYPE: u32 = 0xffff_f004;
/// `SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT`: 1 if the frame's metadata holds a VLAN tag.
const VLAN_TAG_PRESENT: u32 = 0xffff_f030;
const OTHERHOST: u32 = 3;
const OUTGOING: u32 = 4;
const ACCEPT: u32 = 0x0004_0000;
/// Offsets in an Ethernet frame of the ARP sender and target protocol addresses.
const ARP_SENDER_IP: u32 = 14 + 14;
const ARP_TARGET_IP: u32 = 14 + 24;
/// Longest ARP filter [`arp_filter_for`] builds (each owned IPv4 costs 4
/// instructions). 8 bytes each: 8 KiB, well inside the kernel's socket option memory
/// (`net.core.optmem_max`, 20 KiB on older kernels) and BPF_MAXINSNS (4096).
pub const MAX_ARP_FILTER_LEN: usize = 1024;

/// Drops what no filter here wants: our own outgoing frames, frames for another host
/// (including those of a VLAN not terminated here) and frames with a VLAN tag. Falls
/// through to instruction 6 for the rest; instruction 5 is the drop.
fn prologue() -> Vec<SockFilter> {
    vec![
        SockFilter::new(LD_W_ABS, 0, 0, PKTTYPE),
        SockFilter::new(JEQ_K, 3, 0, OUTGOING),  // -> 5 drop
        SockFilter::new(JEQ_K, 2, 0, OTHERHOST), // -> 5 drop
        SockFilter::new(LD_W_ABS, 0, 0, VLAN_TAG_PRESENT),
        SockFilter::new(JEQ_K, 1, 0, 0), // untagged -> 6
        SockFilter::new(RET_K, 0, 0, 0),
    ]
}

/// Every ARP frame addressed to this host (the socket's protocol already selects ARP):
/// for clients and tests that must see all answers, and the fallback of
/// [`arp_filter_for`] above its length budget.
pub fn arp_filter() -> Vec<SockFilter> {
    let mut program = prologue();
    program.push(SockFilter::new(RET_K, 0, 0, ACCEPT));
    program
}

/// ARP frames addressed to this host whose target or sender IP is one of `owned`:
/// requests to answer, and other hosts' replies or announcements for an owned IP
/// (conflicts). Everything else, such as a flood of requests for other addresses, is
/// dropped in the kernel. With more IPs than [`MAX_ARP_FILTER_LEN`] allows, every ARP
/// frame passes ([`arp_filter`]) and user space sorts them out.
pub fn arp_filter_for(owned: &[Ipv4Addr]) -> Vec<SockFilter> {
    let mut program = prologue();
    if program.len() + 4 * owned.len() + 3 > MAX_ARP_FILTER_LEN {
        return arp_filter();
    }
    for offset in [ARP_TARGET_IP, ARP_SENDER_IP] {
        program.push(SockFilter::new(LD_W_ABS, 0, 0, offset));
        for ip in owned {
            // Equal: fall into the accept after it; else skip it.
            program.push(SockFilter::new(JEQ_K, 0, 1, u32::from(*ip)));
            program.push(SockFilter::new(RET_K, 0, 0, ACCEPT));
        }
    }
    program.push(SockFilter::new(RET_K, 0, 0, 0));
    program
}

/// ICMPv6 Neighbor Solicitations and Advertisements (next header 58 right after the
/// IPv6 header, type 135 or 136) addressed to this host, untagged.
pub fn ndp_filter() -> Vec<SockFilter> {
    let mut program = prologue();
    program.extend([
        SockFilter::new(LD_B_ABS, 0, 0, 14 + 6),
        SockFilter::new(JEQ_K, 0, 3, 58), // not ICMPv6 -> drop
        SockFilter::new(LD_B_ABS, 0, 0, 14 + 40),
        SockFilter::new(JEQ_K, 2, 0, 135), // -> accept
        SockFilter::new(JEQ_K, 1, 0, 136), // -> accept
        SockFilter::new(RET_K, 0, 0, 0),
        SockFilter::new(RET_K, 0, 0, ACCEPT),
    ]);
    program
}

pub struct PacketSocket {
    fd: AsyncFd<Socket>,
}

impl PacketSocket {
    /// A raw socket for `ethertype` frames on interface `ifindex`, with `filter` attached
    /// before binding so no unfiltered frame is ever queued.
    pub fn open(ifindex: u32, ethertype: u16, filter: &[SockFilter]) -> io::Result<PacketSocket> {
        let protocol = i32::from(ethertype.to_be());
        let socket = Socket::new(
            Domain::PACKET,
            Type::RAW.nonblocking().cloexec(),
            Some(protocol.into()),
        )?;
        socket.attach_filter(filter)?;
        socket.bind(&link_address(ifindex, ethertype))?;
        // SAFETY: `Socket` owns its descriptor and always returns the same one; the
        // AsyncFd owns the Socket for its whole life.
        let fd = unsafe { AsyncFd::register(socket) }.map_err(|e| e.into_parts().1)?;
        Ok(PacketSocket { fd })
    }

    /// Replaces the kernel filter (atomically: every frame meets the old or the new one;
    /// frames already queued were passed by the old one).
    pub fn set_filter(&self, filter: &[SockFilter]) -> io::Result<()> {
        self.fd.get_ref().attach_filter(filter)
    }

    /// The next frame, truncated to `buf`.
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|inner| inner.get_ref().read(buf)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sends a whole Ethernet frame out of the bound interface.
    pub async fn send(&self, frame: &[u8]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|inner| inner.get_ref().send(frame)) {
                Ok(result) => return result.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Makes the interface accept frames for a link-layer multicast group (the
    /// solicited-node group of an owned IPv6 address) for as long as this socket lives.
    pub fn join_multicast(&self, ifindex: u32, mac: [u8; 6]) -> io::Result<()> {
        let mut mreq: libc::packet_mreq = unsafe { zeroed() };
        mreq.mr_ifindex = ifindex as i32;
        mreq.mr_type = libc::PACKET_MR_MULTICAST as u16;
        mreq.mr_alen = 6;
        mreq.mr_address[..6].copy_from_slice(&mac);
        // SAFETY: a valid packet_mreq of the size passed, on a live AF_PACKET socket.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.get_ref().as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                (&mreq as *const libc::packet_mreq).cast(),
                size_of::<libc::packet_mreq>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn link_address(ifindex: u32, ethertype: u16) -> SockAddr {
    let mut storage = SockAddrStorage::zeroed();
    // SAFETY: sockaddr_storage is larger than sockaddr_ll and suitably aligned; we
    // write a complete sockaddr_ll and pass its exact length.
    unsafe {
        let ll = storage.view_as::<libc::sockaddr_ll>();
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_protocol = ethertype.to_be();
        ll.sll_ifindex = ifindex as i32;
        SockAddr::new(storage, size_of::<libc::sockaddr_ll>() as libc::socklen_t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arp_filter_names_each_owned_ip_until_the_budget_then_passes_all_arp() {
        let ips: Vec<Ipv4Addr> = (0..300u32)
            .map(|i| Ipv4Addr::from(0xc000_0200 + i))
            .collect();
        let some = arp_filter_for(&ips[..10]);
        assert_eq!(some.len(), 6 + 2 * (1 + 2 * 10) + 1);
        assert!(some.len() <= MAX_ARP_FILTER_LEN);
        let fits = (MAX_ARP_FILTER_LEN - 9) / 4;
        assert!(arp_filter_for(&ips[..fits]).len() <= MAX_ARP_FILTER_LEN);
        assert_eq!(arp_filter_for(&ips[..fits + 1]).len(), arp_filter().len());
        // No IPv4 owned: no ARP frame is wanted.
        assert_eq!(arp_filter_for(&[]).len(), 6 + 2 + 1);
    }
}
