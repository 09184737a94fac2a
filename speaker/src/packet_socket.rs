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
//!   filter is rebuilt when ownership changes. With more owned IPs than a program can
//!   name one by one, it names ranges that cover them ([`covering_ranges`]).

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
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
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
/// instructions, each range of them 6). 8 bytes each: 8 KiB, well inside the kernel's
/// socket option memory (`net.core.optmem_max`, 20 KiB on older kernels) and
/// BPF_MAXINSNS (4096).
pub const MAX_ARP_FILTER_LEN: usize = 1024;

/// Instructions of [`arp_filter_for`] besides the ranges: the prologue, a load per
/// address checked, the final drop.
const ARP_FILTER_FIXED: usize = 6 + 2 + 1;

/// Ranges [`arp_filter_for`] can always check within [`MAX_ARP_FILTER_LEN`] (3
/// instructions per range and per address checked).
pub const MAX_ARP_FILTER_RANGES: usize = (MAX_ARP_FILTER_LEN - ARP_FILTER_FIXED) / 6;

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
/// dropped in the kernel. Owned IPs next to each other are checked as one range; with
/// more ranges than [`MAX_ARP_FILTER_LEN`] allows, the closest are merged
/// ([`covering_ranges`]), so a few foreign addresses between owned ones pass and user
/// space drops them, while a flood for anything outside the ranges still costs nothing.
pub fn arp_filter_for(owned: &[Ipv4Addr]) -> Vec<SockFilter> {
    let exact = covering_ranges(owned, usize::MAX);
    let length = |ranges: &[(u32, u32)]| {
        ARP_FILTER_FIXED
            + 2 * ranges
                .iter()
                .map(|(lo, hi)| if lo == hi { 2 } else { 3 })
                .sum::<usize>()
    };
    let ranges = if length(&exact) <= MAX_ARP_FILTER_LEN {
        exact
    } else {
        covering_ranges(owned, MAX_ARP_FILTER_RANGES)
    };
    let mut program = prologue();
    for offset in [ARP_TARGET_IP, ARP_SENDER_IP] {
        program.push(SockFilter::new(LD_W_ABS, 0, 0, offset));
        for &(lo, hi) in &ranges {
            if lo == hi {
                // Equal: fall into the accept after it; else skip it.
                program.push(SockFilter::new(JEQ_K, 0, 1, lo));
            } else {
                // Below: skip the next check and the accept; above: skip the accept.
                program.push(SockFilter::new(JGE_K, 0, 2, lo));
                program.push(SockFilter::new(JGT_K, 1, 0, hi));
            }
            program.push(SockFilter::new(RET_K, 0, 0, ACCEPT));
        }
    }
    program.push(SockFilter::new(RET_K, 0, 0, 0));
    debug_assert!(program.len() <= MAX_ARP_FILTER_LEN);
    program
}

/// At most `max` (at least 1) ranges of addresses, sorted, that cover every one of
/// `owned`: neighbours merged, then the ranges with the smallest gaps between them,
/// until they fit. A merged range also covers the gaps' addresses, none of them owned.
pub fn covering_ranges(owned: &[Ipv4Addr], max: usize) -> Vec<(u32, u32)> {
    let mut ips: Vec<u32> = owned.iter().map(|ip| u32::from(*ip)).collect();
    ips.sort_unstable();
    ips.dedup();
    let mut ranges: Vec<(u32, u32)> = Vec::new();
    for ip in ips {
        match ranges.last_mut() {
            Some((_, hi)) if hi.checked_add(1) == Some(ip) => *hi = ip,
            _ => ranges.push((ip, ip)),
        }
    }
    let max = max.max(1);
    if ranges.len() <= max {
        return ranges;
    }
    // Merge across the smallest gaps: the (len - max) smallest, ties to the lower.
    let mut gaps: Vec<(u32, usize)> = ranges
        .windows(2)
        .enumerate()
        .map(|(i, w)| (w[1].0 - w[0].1, i))
        .collect();
    gaps.sort_unstable();
    let mut merge_after = vec![false; ranges.len()];
    for &(_, i) in &gaps[..ranges.len() - max] {
        merge_after[i] = true;
    }
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(max);
    for (i, range) in ranges.iter().enumerate() {
        match merged.last_mut() {
            Some((_, hi)) if i > 0 && merge_after[i - 1] => *hi = range.1,
            _ => merged.push(*range),
        }
    }
    merged
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
    ///
    /// Created with protocol 0, which receives nothing, and given its protocol by the
    /// bind: a socket created with a protocol already receives from every link, so
    /// binding it must unhook it first and wait out an RCU grace period (about 12 ms
    /// here, twice per link: the wait before a takeover's first gratuitous ARP).
    pub fn open(ifindex: u32, ethertype: u16, filter: &[SockFilter]) -> io::Result<PacketSocket> {
        let socket = Socket::new(Domain::PACKET, Type::RAW.nonblocking().cloexec(), None)?;
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

    use proptest::prelude::*;

    /// What the kernel's classic BPF does with the instructions these programs use, for
    /// an ARP frame with `sender` and `target` IPs, of packet type `pkttype`, untagged:
    /// whether it is accepted. (The lab runs the same programs in the kernel.)
    fn accepts(program: &[SockFilter], sender: u32, target: u32, pkttype: u32) -> bool {
        // SAFETY: SockFilter is `#[repr(transparent)]` over `libc::sock_filter` (its
        // field is private, so the instructions are read back through that layout).
        let raw: Vec<libc::sock_filter> = program
            .iter()
            .map(|i| unsafe { std::mem::transmute_copy::<SockFilter, libc::sock_filter>(i) })
            .collect();
        let mut a = 0u32;
        let mut pc = 0;
        loop {
            let i = raw[pc];
            pc += 1;
            let (jt, jf) = (i.jt as usize, i.jf as usize);
            match i.code {
                LD_W_ABS => {
                    a = match i.k {
                        PKTTYPE => pkttype,
                        VLAN_TAG_PRESENT => 0,
                        ARP_SENDER_IP => sender,
                        ARP_TARGET_IP => target,
                        k => panic!("load from {k}"),
                    }
                }
                JEQ_K => pc += if a == i.k { jt } else { jf },
                JGE_K => pc += if a >= i.k { jt } else { jf },
                JGT_K => pc += if a > i.k { jt } else { jf },
                RET_K => return i.k != 0,
                code => panic!("instruction {code:#x}"),
            }
        }
    }

    const HOST: u32 = 0;
    const BROADCAST: u32 = 1;

    #[test]
    fn the_arp_filter_names_owned_ips_one_by_one_while_they_fit() {
        // Every other address: no neighbours to merge.
        let ips: Vec<Ipv4Addr> = (0..300u32)
            .map(|i| Ipv4Addr::from(0xc000_0200 + 2 * i))
            .collect();
        let some = arp_filter_for(&ips[..10]);
        assert_eq!(some.len(), 6 + 2 * (1 + 2 * 10) + 1);
        let fits = (MAX_ARP_FILTER_LEN - ARP_FILTER_FIXED) / 4;
        assert_eq!(covering_ranges(&ips[..fits], usize::MAX).len(), fits);
        let program = arp_filter_for(&ips[..fits]);
        assert!(program.len() <= MAX_ARP_FILTER_LEN);
        for (i, ip) in ips[..fits].iter().enumerate() {
            assert!(accepts(&program, 1, u32::from(*ip), BROADCAST));
            assert!(!accepts(&program, 1, u32::from(*ip) + 1, BROADCAST), "{i}");
        }
        // No IPv4 owned: no ARP frame is wanted.
        assert_eq!(arp_filter_for(&[]).len(), ARP_FILTER_FIXED);
        assert!(!accepts(&arp_filter_for(&[]), 1, 2, BROADCAST));
    }

    #[test]
    fn neighbours_are_one_range_and_the_closest_ranges_merge_first() {
        let ip = |i: u32| Ipv4Addr::from(0x0a00_0000 + i);
        let owned = [ip(1), ip(2), ip(3), ip(10), ip(12), ip(40), ip(3)];
        assert_eq!(
            covering_ranges(&owned, 10),
            [
                (0x0a00_0001, 0x0a00_0003),
                (0x0a00_000a, 0x0a00_000a),
                (0x0a00_000c, 0x0a00_000c),
                (0x0a00_0028, 0x0a00_0028)
            ]
        );
        assert_eq!(
            covering_ranges(&owned, 2),
            [(0x0a00_0001, 0x0a00_000c), (0x0a00_0028, 0x0a00_0028)]
        );
        assert_eq!(covering_ranges(&owned, 1), [(0x0a00_0001, 0x0a00_0028)]);
        assert_eq!(
            covering_ranges(&[Ipv4Addr::BROADCAST], 1),
            [(u32::MAX, u32::MAX)]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// However many IPs a node owns, the filter fits the budget, passes every
        /// request for an owned IP and every frame from one (conflicts), drops requests
        /// for addresses outside the ranges that cover them, and drops frames for
        /// another host or sent by this one.
        #[test]
        fn the_arp_filter_passes_every_owned_ip_and_drops_what_lies_outside(
            owned in prop::collection::vec(0u32..20_000, 0..3_000),
            foreign in prop::collection::vec(any::<u32>(), 1..50),
        ) {
            let base = 0x0a40_0000u32;
            let owned: Vec<Ipv4Addr> = owned.iter().map(|i| Ipv4Addr::from(base + i)).collect();
            let program = arp_filter_for(&owned);
            prop_assert!(program.len() <= MAX_ARP_FILTER_LEN);
            let ranges = covering_ranges(&owned, MAX_ARP_FILTER_RANGES);
            let unowned = 0x0100_0001;
            for (i, ip) in owned.iter().enumerate() {
                let ip = u32::from(*ip);
                prop_assert!(accepts(&program, unowned, ip, BROADCAST));
                prop_assert!(accepts(&program, ip, unowned, BROADCAST));
                if i < 20 {
                    prop_assert!(accepts(&program, unowned, ip, HOST));
                    prop_assert!(!accepts(&program, unowned, ip, OTHERHOST));
                    prop_assert!(!accepts(&program, unowned, ip, OUTGOING));
                }
            }
            for ip in foreign {
                if ip == unowned || ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&ip)) {
                    continue;
                }
                prop_assert!(!accepts(&program, unowned, ip, BROADCAST), "{}", Ipv4Addr::from(ip));
            }
            // Below and above every owned IP.
            if !owned.is_empty() {
                prop_assert!(!accepts(&program, unowned, base - 1, BROADCAST));
                prop_assert!(!accepts(&program, unowned, base + 20_000, BROADCAST));
            }
        }
    }
}
