//! ARP over Ethernet (RFC 826) and IPv4 address conflict detection frames (RFC 5227).
//!
//! The speaker reads and writes whole Ethernet frames on an `AF_PACKET` socket, so
//! [`parse`] takes a complete frame and the builders return complete frames, padded to
//! the 60-byte Ethernet minimum. Parsing checks every length before reading and only
//! accepts Ethernet/IPv4 ARP: anything else is an [`ArpError`], never a panic.

use std::net::Ipv4Addr;

use pnet_packet::arp::{
    ArpHardwareTypes, ArpOperation, ArpOperations, ArpPacket as ArpView, MutableArpPacket,
};
use pnet_packet::ethernet::{EtherType, EtherTypes, EthernetPacket, MutableEthernetPacket};
use pnet_packet::{MutablePacket, Packet};

/// Length of the Ethernet header (destination, source, ethertype).
const ETHERNET_HEADER_LEN: usize = 14;
/// Length of an Ethernet/IPv4 ARP payload (hlen 6, plen 4).
const ARP_LEN: usize = 28;
/// Minimum Ethernet frame without the FCS; shorter frames are padded with zeros.
pub const MIN_FRAME_LEN: usize = 60;
/// The Ethernet broadcast address, destination of requests, probes and announcements.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

// pnet_packet exposes MAC addresses only as pnet_base::MacAddr, which this crate does not
// depend on; MACs are therefore written at their RFC 826 offsets within the views.
const ETH_DESTINATION: std::ops::Range<usize> = 0..6;
const ETH_SOURCE: std::ops::Range<usize> = 6..12;
const ARP_SENDER_HW: std::ops::Range<usize> = 8..14;
const ARP_TARGET_HW: std::ops::Range<usize> = 18..24;

/// The ARP opcode: the only two RFC 826 defines for address resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// "Who has `target_ip`? Tell `sender_ip`" (opcode 1).
    Request,
    /// "`sender_ip` is at `sender_mac`" (opcode 2).
    Reply,
}

impl Operation {
    fn opcode(self) -> ArpOperation {
        match self {
            Operation::Request => ArpOperations::Request,
            Operation::Reply => ArpOperations::Reply,
        }
    }
}

/// A validated Ethernet/IPv4 ARP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ArpPacket {
    /// Source MAC of the Ethernet header (may differ from `sender_mac` through proxies).
    pub eth_source: [u8; 6],
    pub operation: Operation,
    pub sender_mac: [u8; 6],
    pub sender_ip: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target_ip: Ipv4Addr,
}

impl ArpPacket {
    /// An RFC 5227 probe: a host checking whether `target_ip` is free says it has no
    /// address yet (sender IP 0.0.0.0). Someone answering a probe defends the address.
    pub fn is_probe(&self) -> bool {
        self.sender_ip.is_unspecified()
    }

    /// An RFC 5227 announcement (gratuitous ARP): the sender states its own binding,
    /// sender IP == target IP.
    pub fn is_announcement(&self) -> bool {
        !self.sender_ip.is_unspecified() && self.sender_ip == self.target_ip
    }
}

/// Why a frame is not an ARP packet the speaker acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ArpError {
    #[error("frame of {len} bytes is shorter than an Ethernet header ({ETHERNET_HEADER_LEN})")]
    TruncatedEthernet { len: usize },
    #[error("ethertype {0:#06x} is not ARP (0x0806)")]
    WrongEtherType(u16),
    #[error("ARP payload of {len} bytes is shorter than Ethernet/IPv4 ARP ({ARP_LEN})")]
    TruncatedArp { len: usize },
    #[error("ARP hardware type {0} is not Ethernet (1)")]
    WrongHardwareType(u16),
    #[error("ARP protocol type {0:#06x} is not IPv4 (0x0800)")]
    WrongProtocolType(u16),
    #[error("ARP hardware address length {0} is not 6")]
    WrongHardwareLength(u8),
    #[error("ARP protocol address length {0} is not 4")]
    WrongProtocolLength(u8),
    #[error("ARP opcode {0} is neither request (1) nor reply (2)")]
    UnknownOperation(u16),
}

/// Parses a complete Ethernet frame carrying Ethernet/IPv4 ARP. Trailing bytes after the
/// 28-byte ARP payload (Ethernet padding) are allowed and ignored.
pub fn parse(frame: &[u8]) -> Result<ArpPacket, ArpError> {
    let eth = EthernetPacket::new(frame).ok_or(ArpError::TruncatedEthernet { len: frame.len() })?;
    let EtherType(ethertype) = eth.get_ethertype();
    if eth.get_ethertype() != EtherTypes::Arp {
        return Err(ArpError::WrongEtherType(ethertype));
    }
    let payload = eth.payload();
    let arp = ArpView::new(payload).ok_or(ArpError::TruncatedArp { len: payload.len() })?;
    if arp.get_hardware_type() != ArpHardwareTypes::Ethernet {
        return Err(ArpError::WrongHardwareType(arp.get_hardware_type().0));
    }
    if arp.get_protocol_type() != EtherTypes::Ipv4 {
        return Err(ArpError::WrongProtocolType(arp.get_protocol_type().0));
    }
    if arp.get_hw_addr_len() != 6 {
        return Err(ArpError::WrongHardwareLength(arp.get_hw_addr_len()));
    }
    if arp.get_proto_addr_len() != 4 {
        return Err(ArpError::WrongProtocolLength(arp.get_proto_addr_len()));
    }
    let operation = match arp.get_operation() {
        ArpOperations::Request => Operation::Request,
        ArpOperations::Reply => Operation::Reply,
        ArpOperation(other) => return Err(ArpError::UnknownOperation(other)),
    };
    Ok(ArpPacket {
        eth_source: eth.get_source().octets(),
        operation,
        sender_mac: arp.get_sender_hw_addr().octets(),
        sender_ip: arp.get_sender_proto_addr(),
        target_mac: arp.get_target_hw_addr().octets(),
        target_ip: arp.get_target_proto_addr(),
    })
}

/// The reply to `request` saying `ip` is at `our_mac`, unicast to the requester's
/// hardware address. A probe (sender IP 0.0.0.0) is answered the same way: the prober
/// listens for any ARP naming its candidate address (RFC 5227 §2.1.1).
pub fn reply(request: &ArpPacket, our_mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    build(
        request.sender_mac,
        Operation::Reply,
        our_mac,
        ip,
        request.sender_mac,
        request.sender_ip,
    )
}

/// An RFC 5227 ARP announcement (gratuitous ARP) for `ip`: a broadcast request with
/// sender IP == target IP, so every host on the segment updates its cache to `our_mac`.
pub fn gratuitous(our_mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    build(BROADCAST_MAC, Operation::Request, our_mac, ip, [0; 6], ip)
}

/// An RFC 5227 probe for `ip`: a broadcast request with sender IP 0.0.0.0, so it does
/// not pollute caches while asking whether anyone else already uses `ip`.
pub fn probe(our_mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    build(
        BROADCAST_MAC,
        Operation::Request,
        our_mac,
        Ipv4Addr::UNSPECIFIED,
        [0; 6],
        ip,
    )
}

/// Lays out one padded Ethernet/IPv4 ARP frame; the Ethernet source is the sender MAC.
fn build(
    eth_destination: [u8; 6],
    operation: Operation,
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: Ipv4Addr,
) -> Vec<u8> {
    let mut frame = vec![0u8; MIN_FRAME_LEN];
    let (header, rest) = frame.split_at_mut(ETHERNET_HEADER_LEN);
    if let Some(mut eth) = MutableEthernetPacket::new(header) {
        eth.set_ethertype(EtherTypes::Arp);
        let raw = eth.packet_mut();
        raw[ETH_DESTINATION].copy_from_slice(&eth_destination);
        raw[ETH_SOURCE].copy_from_slice(&sender_mac);
    }
    if let Some(mut arp) = MutableArpPacket::new(&mut rest[..ARP_LEN]) {
        arp.set_hardware_type(ArpHardwareTypes::Ethernet);
        arp.set_protocol_type(EtherTypes::Ipv4);
        arp.set_hw_addr_len(6);
        arp.set_proto_addr_len(4);
        arp.set_operation(operation.opcode());
        arp.set_sender_proto_addr(sender_ip);
        arp.set_target_proto_addr(target_ip);
        let raw = arp.packet_mut();
        raw[ARP_SENDER_HW].copy_from_slice(&sender_mac);
        raw[ARP_TARGET_HW].copy_from_slice(&target_mac);
    }
    frame
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OUR_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];
    const PEER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
    const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
    const PEER_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    /// "Who has 192.0.2.200? Tell 192.0.2.10", written byte by byte from RFC 826.
    fn request_bytes() -> Vec<u8> {
        let mut frame = vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // Ethernet destination: broadcast
            0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, // Ethernet source
            0x08, 0x06, // ethertype ARP
            0x00, 0x01, // htype Ethernet
            0x08, 0x00, // ptype IPv4
            0x06, 0x04, // hlen, plen
            0x00, 0x01, // op request
            0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, // sender MAC
            192, 0, 2, 10, // sender IP
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // target MAC (unknown)
            192, 0, 2, 200, // target IP
        ];
        frame.resize(60, 0);
        frame
    }

    fn request() -> ArpPacket {
        parse(&request_bytes()).expect("hand-built request parses")
    }

    /// A request and the reply Linux 6.x sent to it, captured on a veth pair with
    /// AF_PACKET (unpadded: veth does not pad to 60 bytes).
    const LINUX_REQUEST: [u8; 42] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x08, 0x06, 0x00,
        0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0xc0, 0x00,
        0x02, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0x00, 0x02, 0xc8,
    ];
    const LINUX_REPLY: [u8; 42] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0b, 0x08, 0x06, 0x00,
        0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0b, 0xc0, 0x00,
        0x02, 0xc8, 0x02, 0x00, 0x00, 0x00, 0x00, 0x0a, 0xc0, 0x00, 0x02, 0x0a,
    ];

    #[test]
    fn answers_a_linux_request_exactly_as_linux_does() {
        let asked = parse(&LINUX_REQUEST).unwrap();
        assert_eq!(asked.target_ip, Ipv4Addr::new(192, 0, 2, 200));
        let ours = reply(&asked, [0x02, 0, 0, 0, 0, 0x0b], asked.target_ip);
        assert_eq!(ours[..42], LINUX_REPLY);
        assert!(ours[42..].iter().all(|&b| b == 0), "padding is zeros");
        assert_eq!(parse(&LINUX_REPLY).unwrap().operation, Operation::Reply);
    }

    #[test]
    fn parses_a_request_field_by_field() {
        assert_eq!(
            request(),
            ArpPacket {
                eth_source: PEER_MAC,
                operation: Operation::Request,
                sender_mac: PEER_MAC,
                sender_ip: PEER_IP,
                target_mac: [0; 6],
                target_ip: VIP,
            }
        );
    }

    #[test]
    fn reply_matches_hand_derived_bytes() {
        let mut expected = vec![
            0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, // Ethernet destination: the requester
            0x02, 0x00, 0x5e, 0x10, 0x00, 0x01, // Ethernet source: us
            0x08, 0x06, // ethertype ARP
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, // Ethernet/IPv4
            0x00, 0x02, // op reply
            0x02, 0x00, 0x5e, 0x10, 0x00, 0x01, // sender MAC: us
            192, 0, 2, 200, // sender IP: the VIP
            0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, // target MAC: the requester
            192, 0, 2, 10, // target IP: the requester
        ];
        expected.resize(60, 0);
        assert_eq!(reply(&request(), OUR_MAC, VIP), expected);
    }

    #[test]
    fn gratuitous_matches_hand_derived_bytes() {
        let mut expected = vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x5e, 0x10, 0x00, 0x01, 0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // request
            0x02, 0x00, 0x5e, 0x10, 0x00, 0x01, 192, 0, 2, 200, // sender: us, the VIP
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 192, 0, 2, 200, // target: zero MAC, the VIP
        ];
        expected.resize(60, 0);
        assert_eq!(gratuitous(OUR_MAC, VIP), expected);
    }

    #[test]
    fn reply_round_trips() {
        let parsed = parse(&reply(&request(), OUR_MAC, VIP)).unwrap();
        assert_eq!(
            parsed,
            ArpPacket {
                eth_source: OUR_MAC,
                operation: Operation::Reply,
                sender_mac: OUR_MAC,
                sender_ip: VIP,
                target_mac: PEER_MAC,
                target_ip: PEER_IP,
            }
        );
        assert!(!parsed.is_probe());
        assert!(!parsed.is_announcement());
    }

    #[test]
    fn reply_to_a_probe_goes_to_the_probers_mac() {
        let probe_frame = probe(PEER_MAC, VIP);
        let asked = parse(&probe_frame).unwrap();
        assert!(asked.is_probe());
        let answer = reply(&asked, OUR_MAC, VIP);
        assert_eq!(
            answer[0..6],
            PEER_MAC,
            "unicast to the prober, not broadcast"
        );
        let parsed = parse(&answer).unwrap();
        assert_eq!(parsed.operation, Operation::Reply);
        assert_eq!((parsed.sender_mac, parsed.sender_ip), (OUR_MAC, VIP));
        assert_eq!(
            (parsed.target_mac, parsed.target_ip),
            (PEER_MAC, Ipv4Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn gratuitous_round_trips_as_an_announcement() {
        let frame = gratuitous(OUR_MAC, VIP);
        assert_eq!(frame.len(), MIN_FRAME_LEN);
        assert_eq!(frame[0..6], BROADCAST_MAC);
        let parsed = parse(&frame).unwrap();
        assert_eq!(parsed.operation, Operation::Request);
        assert_eq!((parsed.sender_mac, parsed.sender_ip), (OUR_MAC, VIP));
        assert_eq!((parsed.target_mac, parsed.target_ip), ([0; 6], VIP));
        assert!(parsed.is_announcement());
        assert!(!parsed.is_probe());
    }

    #[test]
    fn probe_round_trips() {
        let frame = probe(OUR_MAC, VIP);
        assert_eq!(frame.len(), MIN_FRAME_LEN);
        assert_eq!(frame[0..6], BROADCAST_MAC);
        let parsed = parse(&frame).unwrap();
        assert_eq!(parsed.operation, Operation::Request);
        assert_eq!(
            (parsed.sender_mac, parsed.sender_ip),
            (OUR_MAC, Ipv4Addr::UNSPECIFIED)
        );
        assert_eq!((parsed.target_mac, parsed.target_ip), ([0; 6], VIP));
        assert!(parsed.is_probe());
        assert!(!parsed.is_announcement());
    }

    #[test]
    fn an_ordinary_request_is_neither_probe_nor_announcement() {
        assert!(!request().is_probe());
        assert!(!request().is_announcement());
    }

    #[test]
    fn accepts_an_unpadded_frame_and_any_trailing_bytes() {
        let mut frame = request_bytes();
        frame.truncate(42);
        assert_eq!(parse(&frame), Ok(request()));
        frame.extend_from_slice(&[0xaa; 30]);
        assert_eq!(parse(&frame), Ok(request()));
    }

    /// Sets `bytes` at `offset` in the valid request and parses it.
    fn corrupt(offset: usize, bytes: &[u8]) -> Result<ArpPacket, ArpError> {
        let mut frame = request_bytes();
        frame[offset..offset + bytes.len()].copy_from_slice(bytes);
        parse(&frame)
    }

    #[test]
    fn rejects_each_wrong_field() {
        assert_eq!(
            corrupt(12, &[0x08, 0x00]),
            Err(ArpError::WrongEtherType(0x0800))
        );
        assert_eq!(
            corrupt(12, &[0x80, 0x35]),
            Err(ArpError::WrongEtherType(0x8035))
        );
        assert_eq!(
            corrupt(14, &[0x00, 0x06]),
            Err(ArpError::WrongHardwareType(6))
        );
        assert_eq!(
            corrupt(16, &[0x86, 0xdd]),
            Err(ArpError::WrongProtocolType(0x86dd))
        );
        assert_eq!(corrupt(18, &[8]), Err(ArpError::WrongHardwareLength(8)));
        assert_eq!(corrupt(19, &[16]), Err(ArpError::WrongProtocolLength(16)));
        assert_eq!(
            corrupt(20, &[0x00, 0x00]),
            Err(ArpError::UnknownOperation(0))
        );
        // RARP request (3) and InARP (8) are not address resolution answers we give.
        assert_eq!(
            corrupt(20, &[0x00, 0x03]),
            Err(ArpError::UnknownOperation(3))
        );
        assert_eq!(
            corrupt(20, &[0x00, 0x08]),
            Err(ArpError::UnknownOperation(8))
        );
    }

    #[test]
    fn rejects_truncated_frames() {
        assert_eq!(parse(&[]), Err(ArpError::TruncatedEthernet { len: 0 }));
        let frame = request_bytes();
        assert_eq!(
            parse(&frame[..13]),
            Err(ArpError::TruncatedEthernet { len: 13 })
        );
        assert_eq!(parse(&frame[..14]), Err(ArpError::TruncatedArp { len: 0 }));
        assert_eq!(parse(&frame[..41]), Err(ArpError::TruncatedArp { len: 27 }));
    }

    #[test]
    fn errors_say_what_was_wrong() {
        assert_eq!(
            ArpError::WrongEtherType(0x86dd).to_string(),
            "ethertype 0x86dd is not ARP (0x0806)"
        );
        assert_eq!(
            ArpError::TruncatedArp { len: 3 }.to_string(),
            "ARP payload of 3 bytes is shorter than Ethernet/IPv4 ARP (28)"
        );
    }

    fn valid_frames() -> impl Strategy<Value = Vec<u8>> {
        (any::<[u8; 6]>(), any::<[u8; 4]>(), 0usize..3).prop_map(|(mac, ip, which)| {
            let ip = Ipv4Addr::from(ip);
            match which {
                0 => gratuitous(mac, ip),
                1 => probe(mac, ip),
                _ => reply(&request(), mac, ip),
            }
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_arp_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Most random frames fail at the ethertype; give the ARP checks real work.
            let mut frame = request_bytes()[..14].to_vec();
            frame.extend_from_slice(&payload);
            let _ = parse(&frame);
        }

        #[test]
        fn any_single_byte_change_parses_or_errors(frame in valid_frames(), at in 0usize..60, value in any::<u8>()) {
            let mut changed = frame.clone();
            changed[at] = value;
            match parse(&changed) {
                // Bytes outside the checked header fields only change the parsed values.
                Ok(_) => prop_assert!(!(12..22).contains(&at) || changed[at] == frame[at]
                    || (at == 21 && (value == 1 || value == 2))),
                Err(_) => prop_assert!((12..22).contains(&at)),
            }
        }

        #[test]
        fn truncation_inside_the_arp_payload_is_rejected(frame in valid_frames(), len in 0usize..42) {
            let err = parse(&frame[..len]).expect_err("a truncated frame");
            if len < 14 {
                prop_assert!(matches!(err, ArpError::TruncatedEthernet { len: l } if l == len), "{err}");
            } else {
                prop_assert!(matches!(err, ArpError::TruncatedArp { len: l } if l == len - 14), "{err}");
            }
        }

        #[test]
        fn truncation_inside_the_padding_keeps_the_fields(frame in valid_frames(), len in 42usize..=60) {
            prop_assert_eq!(parse(&frame[..len]), parse(&frame));
        }
    }
}
