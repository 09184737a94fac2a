//! IPv6 Neighbor Discovery (RFC 4861): Neighbor Solicitations and Advertisements.
//!
//! The speaker reads and writes whole Ethernet frames on an `AF_PACKET` socket, so the
//! kernel has validated nothing: [`parse`] applies the receive checks of RFC 4861
//! §7.1.1 (NS) and §7.1.2 (NA) itself, checking every length before it reads, and
//! returns an [`NdpError`] for anything else. The builders return complete frames with
//! the ICMPv6 checksum filled in.

use std::net::Ipv6Addr;

use pnet_packet::ethernet::{EtherType, EtherTypes, EthernetPacket, MutableEthernetPacket};
use pnet_packet::icmpv6::ndp::{
    MutableNeighborAdvertPacket, MutableNeighborSolicitPacket, NeighborAdvertFlags,
    NeighborAdvertPacket, NeighborSolicitPacket,
};
use pnet_packet::icmpv6::{self, Icmpv6Code, Icmpv6Packet, Icmpv6Types, MutableIcmpv6Packet};
use pnet_packet::ip::{IpNextHeaderProtocol, IpNextHeaderProtocols};
use pnet_packet::ipv6::{Ipv6Packet, MutableIpv6Packet};
use pnet_packet::{MutablePacket, Packet};

const ETHERNET_HEADER_LEN: usize = 14;
const IPV6_HEADER_LEN: usize = 40;
/// Fixed part of an NS or NA: type, code, checksum, reserved/flags, target address.
const ND_HEADER_LEN: usize = 24;
/// A link-layer address option for Ethernet: type, length 1 (8 octets), 6-byte MAC.
const LLADDR_OPTION_LEN: usize = 8;
const OPTION_SOURCE_LLADDR: u8 = 1;
const OPTION_TARGET_LLADDR: u8 = 2;
/// RFC 4861 §7.1: a hop limit below 255 means the packet crossed a router, i.e. it was
/// forged off-link.
const ND_HOP_LIMIT: u8 = 255;
/// Next-header values of the IPv6 extension headers (RFC 8200 §4, RFC 5533, RFC 7401).
const EXTENSION_HEADERS: [u8; 9] = [0, 43, 44, 50, 51, 60, 135, 139, 140];

/// The all-nodes link-local group, destination of unsolicited advertisements.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

// pnet_packet exposes MAC addresses only as pnet_base::MacAddr, which this crate does not
// depend on; Ethernet MACs are therefore written at their offsets within the header view.
const ETH_DESTINATION: std::ops::Range<usize> = 0..6;
const ETH_SOURCE: std::ops::Range<usize> = 6..12;

/// What a validated Neighbor Discovery message says beyond its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NdpKind {
    /// Neighbor Solicitation (type 135). `source_lladdr` is absent for duplicate-address
    /// probes and for unicast reachability probes.
    Solicitation { source_lladdr: Option<[u8; 6]> },
    /// Neighbor Advertisement (type 136) with its R, S and O flags.
    Advertisement {
        router: bool,
        solicited: bool,
        override_: bool,
        target_lladdr: Option<[u8; 6]>,
    },
}

/// A validated NS or NA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NdpPacket {
    /// Source MAC of the Ethernet header: where to answer an NS with no source
    /// link-layer option.
    pub eth_source: [u8; 6],
    /// IPv6 source address (`::` for a duplicate-address probe).
    pub source: Ipv6Addr,
    /// IPv6 destination address.
    pub destination: Ipv6Addr,
    /// The address being solicited or advertised.
    pub target: Ipv6Addr,
    pub kind: NdpKind,
}

/// Why a frame is not a Neighbor Discovery message the speaker acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NdpError {
    #[error("frame of {len} bytes is shorter than an Ethernet header ({ETHERNET_HEADER_LEN})")]
    TruncatedEthernet { len: usize },
    #[error("ethertype {0:#06x} is not IPv6 (0x86dd)")]
    WrongEtherType(u16),
    #[error("IPv6 packet of {len} bytes is shorter than its header ({IPV6_HEADER_LEN})")]
    TruncatedIpv6 { len: usize },
    #[error("IP version {0} is not 6")]
    WrongIpVersion(u8),
    #[error("IPv6 payload length {declared} exceeds the {available} bytes in the frame")]
    PayloadLengthMismatch { declared: usize, available: usize },
    #[error("IPv6 extension header {0} before ICMPv6 is not accepted for Neighbor Discovery")]
    ExtensionHeader(u8),
    #[error("IPv6 next header {0} is not ICMPv6 (58)")]
    NotIcmpv6(u8),
    #[error("hop limit {0} is not 255: the message crossed a router")]
    HopLimit(u8),
    #[error("IPv6 source {0} is multicast")]
    MulticastSource(Ipv6Addr),
    #[error("ICMPv6 message of {len} bytes is shorter than its 4-byte header")]
    TruncatedIcmp { len: usize },
    #[error("ICMPv6 type {0} is neither Neighbor Solicitation (135) nor Advertisement (136)")]
    NotNeighborDiscovery(u8),
    #[error("ICMPv6 checksum {found:#06x} is wrong (expected {expected:#06x})")]
    Checksum { found: u16, expected: u16 },
    #[error("ICMPv6 code {0} is not 0")]
    NonZeroCode(u8),
    #[error("Neighbor Discovery message of {len} bytes is shorter than 24")]
    TooShort { len: usize },
    #[error("target address {0} is multicast")]
    MulticastTarget(Ipv6Addr),
    #[error("option at ICMPv6 offset {offset} has length 0")]
    ZeroLengthOption { offset: usize },
    #[error("option at ICMPv6 offset {offset} runs past the end of the message")]
    OptionOverrun { offset: usize },
    #[error("link-layer address option of {units} units of 8 octets is not an Ethernet address")]
    BadLinkLayerOption { units: u8 },
    #[error("solicitation from :: is sent to {0}, not a solicited-node multicast address")]
    UnspecifiedSourceNotToSolicitedNode(Ipv6Addr),
    #[error("solicitation from :: carries a source link-layer address option")]
    UnspecifiedSourceWithLinkLayerOption,
    #[error("advertisement to multicast {0} has the Solicited flag set")]
    SolicitedToMulticast(Ipv6Addr),
}

/// Parses a complete Ethernet frame carrying an NS or NA directly after the IPv6 header
/// and applies the validity checks of RFC 4861 §7.1.1 and §7.1.2. Bytes after the IPv6
/// payload (Ethernet padding) are ignored, as the kernel's IPv6 input does.
pub fn parse(frame: &[u8]) -> Result<NdpPacket, NdpError> {
    let eth = EthernetPacket::new(frame).ok_or(NdpError::TruncatedEthernet { len: frame.len() })?;
    let EtherType(ethertype) = eth.get_ethertype();
    if eth.get_ethertype() != EtherTypes::Ipv6 {
        return Err(NdpError::WrongEtherType(ethertype));
    }
    let ip_bytes = eth.payload();
    let ip = Ipv6Packet::new(ip_bytes).ok_or(NdpError::TruncatedIpv6 {
        len: ip_bytes.len(),
    })?;
    if ip.get_version() != 6 {
        return Err(NdpError::WrongIpVersion(ip.get_version()));
    }
    let declared = usize::from(ip.get_payload_length());
    let message = ip_bytes
        .get(IPV6_HEADER_LEN..IPV6_HEADER_LEN + declared)
        .ok_or(NdpError::PayloadLengthMismatch {
            declared,
            available: ip_bytes.len().saturating_sub(IPV6_HEADER_LEN),
        })?;
    let IpNextHeaderProtocol(next_header) = ip.get_next_header();
    if next_header != IpNextHeaderProtocols::Icmpv6.0 {
        return Err(if EXTENSION_HEADERS.contains(&next_header) {
            NdpError::ExtensionHeader(next_header)
        } else {
            NdpError::NotIcmpv6(next_header)
        });
    }
    if ip.get_hop_limit() != ND_HOP_LIMIT {
        return Err(NdpError::HopLimit(ip.get_hop_limit()));
    }
    let (source, destination) = (ip.get_source(), ip.get_destination());
    if source.is_multicast() {
        return Err(NdpError::MulticastSource(source));
    }

    let icmp = Icmpv6Packet::new(message).ok_or(NdpError::TruncatedIcmp { len: message.len() })?;
    let icmp_type = icmp.get_icmpv6_type();
    if icmp_type != Icmpv6Types::NeighborSolicit && icmp_type != Icmpv6Types::NeighborAdvert {
        return Err(NdpError::NotNeighborDiscovery(icmp_type.0));
    }
    let found = icmp.get_checksum();
    let expected = icmpv6::checksum(&icmp, &source, &destination);
    // 0x0000 and 0xffff are the same number in one's complement (RFC 1624 §3); pnet's
    // computation yields 0x0000 where a sender may have written 0xffff.
    if found != expected && !(expected == 0 && found == 0xffff) {
        return Err(NdpError::Checksum { found, expected });
    }
    if icmp.get_icmpv6_code() != Icmpv6Code(0) {
        return Err(NdpError::NonZeroCode(icmp.get_icmpv6_code().0));
    }
    if message.len() < ND_HEADER_LEN {
        return Err(NdpError::TooShort { len: message.len() });
    }

    let (target, kind) = if icmp_type == Icmpv6Types::NeighborSolicit {
        let ns =
            NeighborSolicitPacket::new(message).ok_or(NdpError::TooShort { len: message.len() })?;
        let target = ns.get_target_addr();
        let source_lladdr = lladdr_option(message, OPTION_SOURCE_LLADDR)?;
        if source.is_unspecified() {
            if !is_solicited_node_multicast(destination) {
                return Err(NdpError::UnspecifiedSourceNotToSolicitedNode(destination));
            }
            if source_lladdr.is_some() {
                return Err(NdpError::UnspecifiedSourceWithLinkLayerOption);
            }
        }
        (target, NdpKind::Solicitation { source_lladdr })
    } else {
        let na =
            NeighborAdvertPacket::new(message).ok_or(NdpError::TooShort { len: message.len() })?;
        let flags = na.get_flags();
        let solicited = flags & NeighborAdvertFlags::Solicited != 0;
        let target_lladdr = lladdr_option(message, OPTION_TARGET_LLADDR)?;
        if destination.is_multicast() && solicited {
            return Err(NdpError::SolicitedToMulticast(destination));
        }
        let kind = NdpKind::Advertisement {
            router: flags & NeighborAdvertFlags::Router != 0,
            solicited,
            override_: flags & NeighborAdvertFlags::Override != 0,
            target_lladdr,
        };
        (na.get_target_addr(), kind)
    };
    if target.is_multicast() {
        return Err(NdpError::MulticastTarget(target));
    }
    Ok(NdpPacket {
        eth_source: eth.get_source().octets(),
        source,
        destination,
        target,
        kind,
    })
}

/// Walks the options after the fixed 24 bytes of `message`, checking that every option
/// has a non-zero length and fits, and returns the MAC of the first option of type
/// `wanted` (later duplicates are ignored, as Linux does). Unknown options are skipped
/// (RFC 4861 §4.6). pnet's option iterator is not used: it computes `length * 8` in a
/// `u8` and overflows on lengths of 32 or more.
fn lladdr_option(message: &[u8], wanted: u8) -> Result<Option<[u8; 6]>, NdpError> {
    let mut found = None;
    let mut offset = ND_HEADER_LEN;
    while offset < message.len() {
        let rest = &message[offset..];
        let [option_type, units, ..] = *rest else {
            return Err(NdpError::OptionOverrun { offset });
        };
        if units == 0 {
            return Err(NdpError::ZeroLengthOption { offset });
        }
        let len = usize::from(units) * 8;
        let Some(option) = rest.get(..len) else {
            return Err(NdpError::OptionOverrun { offset });
        };
        if option_type == wanted && found.is_none() {
            let Some(mac) = option.get(2..8).filter(|_| units == 1) else {
                return Err(NdpError::BadLinkLayerOption { units });
            };
            let mut addr = [0u8; 6];
            addr.copy_from_slice(mac);
            found = Some(addr);
        }
        offset += len;
    }
    Ok(found)
}

/// The solicited-node multicast group of `ip` (RFC 4291 §2.7.1): ff02::1:ff00:0/104
/// plus the low 24 bits of `ip`. An NS for `ip` from a host without its MAC goes here.
pub fn solicited_node_multicast(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, o[13], o[14], o[15],
    ])
}

/// Whether `ip` lies in ff02::1:ff00:0/104.
pub fn is_solicited_node_multicast(ip: Ipv6Addr) -> bool {
    ip.octets()[..13] == [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff]
}

/// The Ethernet address of an IPv6 multicast group (RFC 2464 §7): 33:33 followed by
/// the low 32 bits of the group.
pub fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The solicited advertisement answering `ns` for its target with `our_mac` (router 0,
/// override 1, target link-layer option). A duplicate-address probe (source `::`) is
/// answered to all-nodes with Solicited 0 (RFC 4861 §7.2.4); anything else is answered
/// unicast with Solicited 1, to the NS's source link-layer option if present, else to
/// its Ethernet source, so reachability probes without the option are answered too.
/// `src_ip` is the caller's choice (the interface's link-local address or the target).
/// Given an advertisement instead of a solicitation, the answer goes to its Ethernet
/// source.
pub fn advertisement_for(ns: &NdpPacket, our_mac: [u8; 6], src_ip: Ipv6Addr) -> Vec<u8> {
    if ns.source.is_unspecified() {
        return advertisement(
            multicast_mac(ALL_NODES),
            our_mac,
            src_ip,
            ALL_NODES,
            ns.target,
            false,
        );
    }
    let eth_destination = match ns.kind {
        NdpKind::Solicitation {
            source_lladdr: Some(mac),
        } => mac,
        _ => ns.eth_source,
    };
    advertisement(eth_destination, our_mac, src_ip, ns.source, ns.target, true)
}

/// An unsolicited advertisement of `target` at `our_mac` to all-nodes (Solicited 0,
/// Override 1), sent on taking an address over so neighbours update their caches.
pub fn unsolicited_advertisement(target: Ipv6Addr, our_mac: [u8; 6], src_ip: Ipv6Addr) -> Vec<u8> {
    advertisement(
        multicast_mac(ALL_NODES),
        our_mac,
        src_ip,
        ALL_NODES,
        target,
        false,
    )
}

/// A Neighbor Solicitation for `target`, sent to its solicited-node multicast group.
/// It carries our source link-layer option unless `src_ip` is `::` (a duplicate-address
/// probe, which RFC 4861 §7.2.2 forbids to carry one).
pub fn solicitation(target: Ipv6Addr, our_mac: [u8; 6], src_ip: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node_multicast(target);
    let with_option = !src_ip.is_unspecified();
    let len = ND_HEADER_LEN + if with_option { LLADDR_OPTION_LEN } else { 0 };
    let mut message = vec![0u8; len];
    if let Some(mut ns) = MutableNeighborSolicitPacket::new(&mut message) {
        ns.set_icmpv6_type(Icmpv6Types::NeighborSolicit);
        ns.set_icmpv6_code(Icmpv6Code(0));
        ns.set_target_addr(target);
    }
    if with_option {
        write_lladdr_option(&mut message[ND_HEADER_LEN..], OPTION_SOURCE_LLADDR, our_mac);
    }
    frame(multicast_mac(group), our_mac, src_ip, group, message)
}

/// An NA for `target` at `our_mac`: router 0, override 1, target link-layer option.
fn advertisement(
    eth_destination: [u8; 6],
    our_mac: [u8; 6],
    src_ip: Ipv6Addr,
    dst_ip: Ipv6Addr,
    target: Ipv6Addr,
    solicited: bool,
) -> Vec<u8> {
    let mut message = vec![0u8; ND_HEADER_LEN + LLADDR_OPTION_LEN];
    if let Some(mut na) = MutableNeighborAdvertPacket::new(&mut message) {
        na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
        na.set_icmpv6_code(Icmpv6Code(0));
        let solicited = if solicited {
            NeighborAdvertFlags::Solicited
        } else {
            0
        };
        na.set_flags(NeighborAdvertFlags::Override | solicited);
        na.set_target_addr(target);
    }
    write_lladdr_option(&mut message[ND_HEADER_LEN..], OPTION_TARGET_LLADDR, our_mac);
    frame(eth_destination, our_mac, src_ip, dst_ip, message)
}

fn write_lladdr_option(option: &mut [u8], option_type: u8, mac: [u8; 6]) {
    if let Some(option) = option.get_mut(..LLADDR_OPTION_LEN) {
        option[0] = option_type;
        option[1] = 1;
        option[2..].copy_from_slice(&mac);
    }
}

/// Wraps an ICMPv6 `message` in IPv6 (hop limit 255) and Ethernet headers and fills in
/// the ICMPv6 checksum over the pseudo-header.
fn frame(
    eth_destination: [u8; 6],
    eth_source: [u8; 6],
    src_ip: Ipv6Addr,
    dst_ip: Ipv6Addr,
    mut message: Vec<u8>,
) -> Vec<u8> {
    if let Some(mut icmp) = MutableIcmpv6Packet::new(&mut message) {
        let checksum = icmpv6::checksum(&icmp.to_immutable(), &src_ip, &dst_ip);
        icmp.set_checksum(checksum);
    }
    let mut frame = vec![0u8; ETHERNET_HEADER_LEN + IPV6_HEADER_LEN];
    if let Some(mut eth) = MutableEthernetPacket::new(&mut frame[..ETHERNET_HEADER_LEN]) {
        eth.set_ethertype(EtherTypes::Ipv6);
        let raw = eth.packet_mut();
        raw[ETH_DESTINATION].copy_from_slice(&eth_destination);
        raw[ETH_SOURCE].copy_from_slice(&eth_source);
    }
    if let Some(mut ip) = MutableIpv6Packet::new(&mut frame[ETHERNET_HEADER_LEN..]) {
        ip.set_version(6);
        // ND messages are at most a few dozen bytes; the conversion cannot fail.
        ip.set_payload_length(u16::try_from(message.len()).unwrap_or(u16::MAX));
        ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
        ip.set_hop_limit(ND_HOP_LIMIT);
        ip.set_source(src_ip);
        ip.set_destination(dst_ip);
    }
    frame.extend_from_slice(&message);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OUR_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];
    const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    const VIP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x200);
    const PEER_IP: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
    const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

    /// "Who has 2001:db8::200?" from 2001:db8::10, to ff02::1:ff00:200, with a source
    /// link-layer option, written byte by byte from RFC 8200 and RFC 4861 §4.3. The
    /// checksum 0xf92d was computed independently (one's complement sum in Python).
    fn ns_bytes() -> Vec<u8> {
        vec![
            0x33, 0x33, 0xff, 0x00, 0x02, 0x00, // Ethernet destination: 33:33 + group
            0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, // Ethernet source
            0x86, 0xdd, // ethertype IPv6
            0x60, 0x00, 0x00, 0x00, // version 6, traffic class 0, flow label 0
            0x00, 0x20, // payload length 32
            58,   // next header ICMPv6
            255,  // hop limit
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x10, // source
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, 0x00, 0x02, 0x00, // dest
            135, 0, // type NS, code 0
            0xf9, 0x2d, // checksum
            0, 0, 0, 0, // reserved
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x00, // target
            1, 1, 0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, // source link-layer option
        ]
    }

    fn ns() -> NdpPacket {
        parse(&ns_bytes()).expect("hand-built NS parses")
    }

    /// Recomputes the ICMPv6 checksum of a frame after a test changed a field, so the
    /// change reaches the check it is aimed at.
    fn fix_checksum(frame: &mut [u8]) {
        let Some(ip) = Ipv6Packet::new(&frame[14..]) else {
            return;
        };
        let (src, dst) = (ip.get_source(), ip.get_destination());
        let end = (54 + usize::from(ip.get_payload_length())).min(frame.len());
        if let Some(mut icmp) = MutableIcmpv6Packet::new(&mut frame[54..end]) {
            let sum = icmpv6::checksum(&icmp.to_immutable(), &src, &dst);
            icmp.set_checksum(sum);
        }
    }

    /// Sets `bytes` at `offset` in `frame`, fixes the checksum and parses.
    fn corrupt(mut frame: Vec<u8>, offset: usize, bytes: &[u8]) -> Result<NdpPacket, NdpError> {
        frame[offset..offset + bytes.len()].copy_from_slice(bytes);
        fix_checksum(&mut frame);
        parse(&frame)
    }

    /// Replaces the ICMPv6 options of `frame`, updating the payload length and checksum.
    fn with_options(mut frame: Vec<u8>, options: &[u8]) -> Vec<u8> {
        frame.truncate(54 + ND_HEADER_LEN);
        frame.extend_from_slice(options);
        let len = u16::try_from(frame.len() - 54).unwrap();
        frame[18..20].copy_from_slice(&len.to_be_bytes());
        fix_checksum(&mut frame);
        frame
    }

    /// A valid duplicate-address probe for VIP.
    fn dad_probe() -> Vec<u8> {
        solicitation(VIP, PEER_MAC, Ipv6Addr::UNSPECIFIED)
    }

    /// Frames Linux 6.x sent on a veth pair, captured with AF_PACKET: an NS for
    /// 2001:db8::200, the NA Linux answered it with, and a DAD probe carrying the
    /// RFC 7527 nonce option.
    const LINUX_NS: [u8; 86] = [
        0x33, 0x33, 0xff, 0x00, 0x02, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x86, 0xdd, 0x60,
        0x00, 0x00, 0x00, 0x00, 0x20, 0x3a, 0xff, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0x00, 0x02, 0x00, 0x87, 0x00, 0x18, 0x13, 0x00, 0x00,
        0x00, 0x00, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x02, 0x00, 0x01, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a,
    ];
    const LINUX_NA: [u8; 86] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0b, 0x86, 0xdd, 0x60,
        0x00, 0x00, 0x00, 0x00, 0x20, 0x3a, 0xff, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x88, 0x00, 0x86, 0x5d, 0x60, 0x00,
        0x00, 0x00, 0x20, 0x01, 0x0d, 0xb8, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x02, 0x00, 0x02, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0b,
    ];
    const LINUX_DAD_PROBE: [u8; 86] = [
        0x33, 0x33, 0xff, 0x00, 0x00, 0x0a, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x86, 0xdd, 0x60,
        0x00, 0x00, 0x00, 0x00, 0x20, 0x3a, 0xff, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0x00, 0x00, 0x0a, 0x87, 0x00, 0xf2, 0xb5, 0x00, 0x00,
        0x00, 0x00, 0xfe, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xfe,
        0x00, 0x00, 0x0a, 0x0e, 0x01, 0xc2, 0xe6, 0x28, 0x3f, 0x91, 0x2e,
    ];

    #[test]
    fn answers_a_linux_solicitation_exactly_as_linux_does() {
        let asked = parse(&LINUX_NS).unwrap();
        assert_eq!(asked.target, VIP);
        let ours = advertisement_for(&asked, [0x02, 0, 0, 0, 0, 0x0b], VIP);
        assert_eq!(ours, LINUX_NA);
        assert!(matches!(
            parse(&LINUX_NA).unwrap().kind,
            NdpKind::Advertisement {
                solicited: true,
                override_: true,
                ..
            }
        ));
    }

    #[test]
    fn parses_a_linux_dad_probe_with_a_nonce_option() {
        let probe = parse(&LINUX_DAD_PROBE).unwrap();
        assert_eq!(probe.source, Ipv6Addr::UNSPECIFIED);
        assert_eq!(probe.target, "fe80::ff:fe00:a".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            probe.kind,
            NdpKind::Solicitation {
                source_lladdr: None
            }
        );
    }

    #[test]
    fn parses_a_solicitation_field_by_field() {
        assert_eq!(
            ns(),
            NdpPacket {
                eth_source: PEER_MAC,
                source: PEER_IP,
                destination: solicited_node_multicast(VIP),
                target: VIP,
                kind: NdpKind::Solicitation {
                    source_lladdr: Some(PEER_MAC)
                },
            }
        );
    }

    #[test]
    fn solicitation_builder_matches_hand_derived_bytes() {
        assert_eq!(solicitation(VIP, PEER_MAC, PEER_IP), ns_bytes());
    }

    #[test]
    fn advertisement_matches_hand_derived_bytes() {
        // Answer from the target itself, checksum 0x2857 computed independently.
        let expected = vec![
            0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, // Ethernet destination: the NS's lladdr
            0x02, 0x00, 0x5e, 0x10, 0x00, 0x01, // Ethernet source: us
            0x86, 0xdd, // IPv6
            0x60, 0x00, 0x00, 0x00, 0x00, 0x20, 58, 255, // payload 32, ICMPv6, hop 255
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x00, // source
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x10, // dest
            136, 0, // type NA, code 0
            0x28, 0x57, // checksum
            0x60, 0, 0, 0, // R=0 S=1 O=1, reserved
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x00, // target
            2, 1, 0x02, 0x00, 0x5e, 0x10, 0x00, 0x01, // target link-layer option: us
        ];
        assert_eq!(advertisement_for(&ns(), OUR_MAC, VIP), expected);
    }

    #[test]
    fn solicited_advertisement_round_trips() {
        let frame = advertisement_for(&ns(), OUR_MAC, LINK_LOCAL);
        assert_eq!(frame[0..6], PEER_MAC);
        assert_eq!(
            parse(&frame),
            Ok(NdpPacket {
                eth_source: OUR_MAC,
                source: LINK_LOCAL,
                destination: PEER_IP,
                target: VIP,
                kind: NdpKind::Advertisement {
                    router: false,
                    solicited: true,
                    override_: true,
                    target_lladdr: Some(OUR_MAC),
                },
            })
        );
    }

    #[test]
    fn reachability_probe_without_lladdr_is_answered_to_its_ethernet_source() {
        // A unicast NS to the VIP itself, with no source link-layer option.
        let mut probe = with_options(ns_bytes(), &[]);
        probe[0..6].copy_from_slice(&OUR_MAC);
        probe[38..54].copy_from_slice(&VIP.octets());
        fix_checksum(&mut probe);
        let asked = parse(&probe).unwrap();
        assert_eq!(
            asked.kind,
            NdpKind::Solicitation {
                source_lladdr: None
            }
        );
        let frame = advertisement_for(&asked, OUR_MAC, VIP);
        assert_eq!(frame[0..6], PEER_MAC);
        let answer = parse(&frame).unwrap();
        assert_eq!(answer.destination, PEER_IP);
        assert!(matches!(
            answer.kind,
            NdpKind::Advertisement {
                solicited: true,
                ..
            }
        ));
    }

    #[test]
    fn lladdr_option_wins_over_ethernet_source() {
        let mut frame = ns_bytes();
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]); // e.g. a proxy
        let asked = parse(&frame).unwrap();
        assert_eq!(advertisement_for(&asked, OUR_MAC, VIP)[0..6], PEER_MAC);
    }

    #[test]
    fn duplicate_address_probe_is_answered_to_all_nodes() {
        let asked = parse(&dad_probe()).unwrap();
        assert_eq!(asked.source, Ipv6Addr::UNSPECIFIED);
        assert_eq!(
            asked.kind,
            NdpKind::Solicitation {
                source_lladdr: None
            }
        );
        let frame = advertisement_for(&asked, OUR_MAC, VIP);
        assert_eq!(frame[0..6], [0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(
            parse(&frame),
            Ok(NdpPacket {
                eth_source: OUR_MAC,
                source: VIP,
                destination: ALL_NODES,
                target: VIP,
                kind: NdpKind::Advertisement {
                    router: false,
                    solicited: false,
                    override_: true,
                    target_lladdr: Some(OUR_MAC),
                },
            })
        );
    }

    #[test]
    fn unsolicited_advertisement_round_trips() {
        let frame = unsolicited_advertisement(VIP, OUR_MAC, LINK_LOCAL);
        assert_eq!(frame.len(), 14 + 40 + 32);
        assert_eq!(frame[0..6], [0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(
            parse(&frame),
            Ok(NdpPacket {
                eth_source: OUR_MAC,
                source: LINK_LOCAL,
                destination: ALL_NODES,
                target: VIP,
                kind: NdpKind::Advertisement {
                    router: false,
                    solicited: false,
                    override_: true,
                    target_lladdr: Some(OUR_MAC),
                },
            })
        );
    }

    #[test]
    fn solicitation_round_trips_with_and_without_source() {
        let frame = solicitation(VIP, OUR_MAC, LINK_LOCAL);
        assert_eq!(frame[0..6], multicast_mac(solicited_node_multicast(VIP)));
        let parsed = parse(&frame).unwrap();
        assert_eq!(parsed.destination, solicited_node_multicast(VIP));
        assert_eq!(
            parsed.kind,
            NdpKind::Solicitation {
                source_lladdr: Some(OUR_MAC)
            }
        );
        assert_eq!(dad_probe().len(), 14 + 40 + 24);
    }

    #[test]
    fn multicast_helpers() {
        let ip: Ipv6Addr = "2001:db8::abcd:12:3456".parse().unwrap();
        let group = solicited_node_multicast(ip);
        assert_eq!(group, "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap());
        assert!(is_solicited_node_multicast(group));
        assert!(!is_solicited_node_multicast(ALL_NODES));
        assert!(!is_solicited_node_multicast(ip));
        assert_eq!(multicast_mac(group), [0x33, 0x33, 0xff, 0x12, 0x34, 0x56]);
        assert_eq!(multicast_mac(ALL_NODES), [0x33, 0x33, 0, 0, 0, 1]);
    }

    #[test]
    fn accepts_trailing_bytes_after_the_ipv6_payload() {
        let mut frame = ns_bytes();
        frame.extend_from_slice(&[0xee; 4]);
        assert_eq!(parse(&frame), Ok(ns()));
    }

    #[test]
    fn skips_unknown_options_and_keeps_the_first_lladdr() {
        let options = [
            14, 1, 1, 2, 3, 4, 5, 6, // a nonce option (RFC 3971), ignored
            2, 1, 9, 9, 9, 9, 9, 9, // a target lladdr in an NS, ignored
            1, 1, 0xa, 0xb, 0xc, 0xd, 0xe, 0xf, // the source lladdr
            1, 1, 1, 1, 1, 1, 1, 1, // a duplicate, ignored
        ];
        let parsed = parse(&with_options(ns_bytes(), &options)).unwrap();
        assert_eq!(
            parsed.kind,
            NdpKind::Solicitation {
                source_lladdr: Some([0xa, 0xb, 0xc, 0xd, 0xe, 0xf])
            }
        );
    }

    #[test]
    fn accepts_a_checksum_of_ffff_for_zero() {
        // Find a reserved-field value whose checksum comes out as 0x0000, then write it
        // as 0xffff, its one's-complement twin.
        let mut frame = ns_bytes();
        frame[56..58].copy_from_slice(&[0, 0]);
        fix_checksum(&mut frame);
        let sum = u16::from_be_bytes([frame[56], frame[57]]);
        // Adding `sum` to a summed word makes the folded total 0xffff, checksum 0.
        frame[58..60].copy_from_slice(&sum.to_be_bytes());
        fix_checksum(&mut frame);
        assert_eq!(frame[56..58], [0, 0]);
        frame[56..58].copy_from_slice(&[0xff, 0xff]);
        assert!(parse(&frame).is_ok());
    }

    #[test]
    fn rejects_wrong_link_and_ip_headers() {
        let frame = ns_bytes();
        assert_eq!(
            parse(&frame[..10]),
            Err(NdpError::TruncatedEthernet { len: 10 })
        );
        assert_eq!(
            corrupt(frame.clone(), 12, &[0x08, 0x00]),
            Err(NdpError::WrongEtherType(0x0800))
        );
        assert_eq!(
            parse(&frame[..53]),
            Err(NdpError::TruncatedIpv6 { len: 39 })
        );
        assert_eq!(
            corrupt(frame.clone(), 14, &[0x40]),
            Err(NdpError::WrongIpVersion(4))
        );
        assert_eq!(
            corrupt(frame.clone(), 18, &[0x00, 0x21]),
            Err(NdpError::PayloadLengthMismatch {
                declared: 33,
                available: 32
            })
        );
        assert_eq!(
            parse(&frame[..85]),
            Err(NdpError::PayloadLengthMismatch {
                declared: 32,
                available: 31
            })
        );
        assert_eq!(
            corrupt(frame.clone(), 20, &[0]),
            Err(NdpError::ExtensionHeader(0))
        );
        assert_eq!(
            corrupt(frame.clone(), 20, &[44]),
            Err(NdpError::ExtensionHeader(44))
        );
        assert_eq!(
            corrupt(frame.clone(), 20, &[17]),
            Err(NdpError::NotIcmpv6(17))
        );
        assert_eq!(
            corrupt(frame.clone(), 21, &[254]),
            Err(NdpError::HopLimit(254))
        );
        assert_eq!(corrupt(frame.clone(), 21, &[1]), Err(NdpError::HopLimit(1)));
        assert_eq!(
            corrupt(frame.clone(), 22, &[0xff, 0x02]),
            Err(NdpError::MulticastSource("ff02:db8::10".parse().unwrap()))
        );
    }

    #[test]
    fn rejects_wrong_icmp_headers() {
        let frame = ns_bytes();
        assert_eq!(
            parse(&with_options(frame.clone(), &[])[..56]),
            Err(NdpError::PayloadLengthMismatch {
                declared: 24,
                available: 2
            })
        );
        let mut short = frame.clone();
        short.truncate(57);
        short[18..20].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse(&short), Err(NdpError::TruncatedIcmp { len: 3 }));
        // An echo request, a router solicitation: not ours.
        assert_eq!(
            corrupt(frame.clone(), 54, &[128]),
            Err(NdpError::NotNeighborDiscovery(128))
        );
        assert_eq!(
            corrupt(frame.clone(), 54, &[133]),
            Err(NdpError::NotNeighborDiscovery(133))
        );
        let mut bad_sum = frame.clone();
        bad_sum[57] ^= 1;
        assert_eq!(
            parse(&bad_sum),
            Err(NdpError::Checksum {
                found: 0xf92c,
                expected: 0xf92d
            })
        );
        let mut flipped = frame.clone();
        flipped[70] ^= 0x80; // a bit of the target: the checksum no longer matches
        assert!(matches!(parse(&flipped), Err(NdpError::Checksum { .. })));
        assert_eq!(
            corrupt(frame.clone(), 55, &[1]),
            Err(NdpError::NonZeroCode(1))
        );
        let mut tiny = frame.clone();
        tiny.truncate(54 + 23);
        tiny[18..20].copy_from_slice(&23u16.to_be_bytes());
        fix_checksum(&mut tiny);
        assert_eq!(parse(&tiny), Err(NdpError::TooShort { len: 23 }));
    }

    #[test]
    fn rejects_a_multicast_target() {
        assert_eq!(
            corrupt(ns_bytes(), 62, &[0xff, 0x02]),
            Err(NdpError::MulticastTarget("ff02:db8::200".parse().unwrap()))
        );
        let na = unsolicited_advertisement(VIP, OUR_MAC, LINK_LOCAL);
        assert_eq!(
            corrupt(na, 62, &[0xff, 0x02]),
            Err(NdpError::MulticastTarget("ff02:db8::200".parse().unwrap()))
        );
    }

    #[test]
    fn rejects_bad_options() {
        let frame = ns_bytes();
        assert_eq!(
            parse(&with_options(frame.clone(), &[1, 0, 0, 0, 0, 0, 0, 0])),
            Err(NdpError::ZeroLengthOption { offset: 24 })
        );
        // An unknown option of length zero is just as fatal: the walk cannot proceed.
        assert_eq!(
            parse(&with_options(
                frame.clone(),
                &[14, 1, 0, 0, 0, 0, 0, 0, 99, 0, 0, 0, 0, 0, 0, 0]
            )),
            Err(NdpError::ZeroLengthOption { offset: 32 })
        );
        assert_eq!(
            parse(&with_options(frame.clone(), &[1, 2, 1, 2, 3, 4, 5, 6])),
            Err(NdpError::OptionOverrun { offset: 24 })
        );
        // Length 255 (2040 bytes): pnet's own option walk would overflow here.
        assert_eq!(
            parse(&with_options(frame.clone(), &[14, 255, 0, 0, 0, 0, 0, 0])),
            Err(NdpError::OptionOverrun { offset: 24 })
        );
        assert_eq!(
            parse(&with_options(frame.clone(), &[1])),
            Err(NdpError::OptionOverrun { offset: 24 })
        );
        assert_eq!(
            parse(&with_options(frame.clone(), &[1, 1, 1, 2, 3, 4, 5])),
            Err(NdpError::OptionOverrun { offset: 24 })
        );
        assert_eq!(
            parse(&with_options(
                frame.clone(),
                &[1, 2, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0, 0, 0]
            )),
            Err(NdpError::BadLinkLayerOption { units: 2 })
        );
        let na = unsolicited_advertisement(VIP, OUR_MAC, LINK_LOCAL);
        assert_eq!(
            parse(&with_options(na, &[2, 0, 0, 0, 0, 0, 0, 0])),
            Err(NdpError::ZeroLengthOption { offset: 24 })
        );
    }

    #[test]
    fn rejects_unspecified_source_rules() {
        let probe = dad_probe();
        assert!(parse(&probe).is_ok());
        // A DAD probe must go to a solicited-node group...
        assert_eq!(
            corrupt(probe.clone(), 38 + 15, &[0x02]).map(|p| p.destination),
            Ok("ff02::1:ff00:202".parse().unwrap()),
            "any solicited-node group will do"
        );
        assert_eq!(
            corrupt(probe.clone(), 38 + 11, &[0x00]),
            Err(NdpError::UnspecifiedSourceNotToSolicitedNode(
                "ff02::ff00:200".parse().unwrap()
            ))
        );
        let mut unicast = probe.clone();
        unicast[38..54].copy_from_slice(&VIP.octets());
        fix_checksum(&mut unicast);
        assert_eq!(
            parse(&unicast),
            Err(NdpError::UnspecifiedSourceNotToSolicitedNode(VIP))
        );
        // ...and must not carry a source link-layer option.
        assert_eq!(
            parse(&with_options(probe, &[1, 1, 1, 2, 3, 4, 5, 6])),
            Err(NdpError::UnspecifiedSourceWithLinkLayerOption)
        );
    }

    #[test]
    fn rejects_solicited_advertisement_to_multicast() {
        let na = unsolicited_advertisement(VIP, OUR_MAC, LINK_LOCAL);
        assert_eq!(
            corrupt(na.clone(), 58, &[0x60]),
            Err(NdpError::SolicitedToMulticast(ALL_NODES))
        );
        // Router and Override flags alone are fine on multicast.
        let parsed = corrupt(na, 58, &[0xa0]).unwrap();
        assert_eq!(
            parsed.kind,
            NdpKind::Advertisement {
                router: true,
                solicited: false,
                override_: true,
                target_lladdr: Some(OUR_MAC)
            }
        );
    }

    #[test]
    fn errors_say_what_was_wrong() {
        assert_eq!(
            NdpError::HopLimit(64).to_string(),
            "hop limit 64 is not 255: the message crossed a router"
        );
        assert_eq!(
            NdpError::Checksum {
                found: 1,
                expected: 2
            }
            .to_string(),
            "ICMPv6 checksum 0x0001 is wrong (expected 0x0002)"
        );
    }

    fn valid_frames() -> impl Strategy<Value = Vec<u8>> {
        (
            any::<[u8; 6]>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            0usize..5,
        )
            .prop_map(|(mac, mut target, mut src, which)| {
                // Keep target and source out of ff00::/8 so every input is valid.
                target[0] &= 0xfe;
                src[0] &= 0xfe;
                let (target, src) = (Ipv6Addr::from(target), Ipv6Addr::from(src));
                match which {
                    0 => solicitation(target, mac, src),
                    1 => solicitation(target, mac, Ipv6Addr::UNSPECIFIED),
                    2 => unsolicited_advertisement(target, mac, src),
                    3 => advertisement_for(&ns(), mac, src),
                    _ => advertisement_for(&parse(&dad_probe()).unwrap(), mac, src),
                }
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..160)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_icmp_messages_never_panic(
            message in proptest::collection::vec(any::<u8>(), 0..96),
            na in any::<bool>(),
            payload_length in any::<Option<u16>>(),
        ) {
            // Random frames rarely get past the checksum; build valid headers around
            // random ICMPv6 bytes (or a random payload length) and fix the checksum.
            let mut frame = ns_bytes()[..54].to_vec();
            frame.extend_from_slice(&message);
            if let Some(first) = frame.get_mut(54) {
                *first = if na { 136 } else { 135 };
            }
            let len = payload_length.unwrap_or(u16::try_from(message.len()).unwrap());
            frame[18..20].copy_from_slice(&len.to_be_bytes());
            fix_checksum(&mut frame);
            let _ = parse(&frame);
        }

        #[test]
        fn any_single_byte_change_parses_or_errors(
            frame in valid_frames(),
            at in 0usize..86,
            value in any::<u8>(),
            fix in any::<bool>(),
        ) {
            let mut changed = frame.clone();
            let at = at % changed.len();
            changed[at] = value;
            if fix {
                fix_checksum(&mut changed);
            }
            if let Ok(parsed) = parse(&changed) {
                // Whatever is accepted still satisfies the rules.
                prop_assert!(!parsed.target.is_multicast());
                prop_assert!(!parsed.source.is_multicast());
            }
            // Without a recomputed checksum, a change past the Ethernet header and outside
            // the IPv6 fields the checksum does not cover is caught.
            if !fix && at >= 54 && changed[at] != frame[at] {
                let err = parse(&changed).expect_err("a change the checksum covers");
                // The type is read before the checksum is checked.
                if at == 54 && !matches!(value, 135 | 136) {
                    prop_assert!(matches!(err, NdpError::NotNeighborDiscovery(t) if t == value), "{err}");
                } else {
                    prop_assert!(matches!(err, NdpError::Checksum { .. }), "{err}");
                }
            }
        }

        #[test]
        fn truncation_at_any_length_is_rejected(frame in valid_frames(), len in 0usize..86) {
            let len = len % frame.len();
            // Rejected as too short, whichever layer runs out first.
            let err = parse(&frame[..len]).expect_err("a truncated frame");
            prop_assert!(
                matches!(
                    err,
                    NdpError::TruncatedEthernet { .. }
                        | NdpError::TruncatedIpv6 { .. }
                        | NdpError::PayloadLengthMismatch { .. }
                        | NdpError::TruncatedIcmp { .. }
                        | NdpError::TooShort { .. }
                ),
                "{len} bytes: {err}"
            );
        }
    }
}
