//! AF_PACKET sockets bound to one interface, filtered in the kernel to the frames the
//! responder needs, under tokio's `AsyncFd`.
//!
//! Not pnet's datalink channels: those are blocking, promiscuous and see every frame.
//! Here a classic BPF program drops everything but ARP (or ICMPv6 NS/NA) and our own
//! outgoing frames before they are copied to user space.

use std::io::{self, Read};
use std::mem::{size_of, zeroed};
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
/// `SKF_AD_OFF + SKF_AD_PKTTYPE`: loads the packet type (4 = PACKET_OUTGOING).
const PKTTYPE: u32 = 0xffff_f004;
const OUTGOING: u32 = 4;
const ACCEPT: u32 = 0x0004_0000;

/// ARP frames not sent by this host (the socket's protocol already selects ARP).
pub fn arp_filter() -> Vec<SockFilter> {
    vec![
        SockFilter::new(LD_W_ABS, 0, 0, PKTTYPE),
        SockFilter::new(JEQ_K, 0, 1, OUTGOING),
        SockFilter::new(RET_K, 0, 0, 0),
        SockFilter::new(RET_K, 0, 0, ACCEPT),
    ]
}

/// ICMPv6 Neighbor Solicitations and Advertisements (next header 58 right after the
/// IPv6 header, type 135 or 136) not sent by this host.
pub fn ndp_filter() -> Vec<SockFilter> {
    vec![
        SockFilter::new(LD_W_ABS, 0, 0, PKTTYPE),
        SockFilter::new(JEQ_K, 5, 0, OUTGOING), // -> drop
        SockFilter::new(LD_B_ABS, 0, 0, 14 + 6),
        SockFilter::new(JEQ_K, 0, 3, 58), // not ICMPv6 -> drop
        SockFilter::new(LD_B_ABS, 0, 0, 14 + 40),
        SockFilter::new(JEQ_K, 2, 0, 135), // -> accept
        SockFilter::new(JEQ_K, 1, 0, 136), // -> accept
        SockFilter::new(RET_K, 0, 0, 0),
        SockFilter::new(RET_K, 0, 0, ACCEPT),
    ]
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
