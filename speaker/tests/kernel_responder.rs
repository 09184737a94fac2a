//! The kernel responder's program run by the kernel on frames of our choosing
//! (`BPF_PROG_TEST_RUN`): what it answers, what it passes on, and that its answer is the
//! speaker's own. Needs root (CAP_BPF and CAP_NET_ADMIN) and a kernel with BPF: without
//! them these tests fail, as the speaker would fall back to answering in user space.

use std::net::Ipv4Addr;
use std::sync::LazyLock;
use std::time::Duration;

use ferrolb_speaker::arp::{self, Operation};
use ferrolb_speaker::kernel_responder::Loaded;
use ferrolb_speaker::kernel_responder::program::{Entry, TCX_NEXT, TCX_REDIRECT};
use proptest::prelude::*;

const OURS: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
const BROADCAST: [u8; 6] = [0xff; 6];
const ANSWERED: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const PROBING: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
const FOREIGN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 50);

/// The program with ANSWERED answered and PROBING the link's but left to the speaker.
fn loaded() -> Loaded {
    let loaded = Loaded::load().expect("loading the program (root, CAP_BPF and a BPF kernel)");
    let entry = |answering| Entry {
        mac: OURS,
        answering,
    };
    loaded.set(ANSWERED, Some(entry(true))).unwrap();
    loaded.set(PROBING, Some(entry(false))).unwrap();
    loaded.renew(Duration::from_secs(600)).unwrap();
    loaded
}

/// One ARP frame, field by field.
#[derive(Clone, Debug)]
struct Frame {
    destination: [u8; 6],
    source: [u8; 6],
    ethertype: u16,
    hardware: u16,
    protocol: u16,
    lengths: (u8, u8),
    op: u16,
    sender_mac: [u8; 6],
    sender_ip: Ipv4Addr,
    target_ip: Ipv4Addr,
    len: usize,
}

impl Frame {
    fn request(target_ip: Ipv4Addr) -> Frame {
        Frame {
            destination: BROADCAST,
            source: CLIENT,
            ethertype: 0x0806,
            hardware: 1,
            protocol: 0x0800,
            lengths: (6, 4),
            op: 1,
            sender_mac: CLIENT,
            sender_ip: CLIENT_IP,
            target_ip,
            len: 60,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 60.max(self.len)];
        b[0..6].copy_from_slice(&self.destination);
        b[6..12].copy_from_slice(&self.source);
        b[12..14].copy_from_slice(&self.ethertype.to_be_bytes());
        b[14..16].copy_from_slice(&self.hardware.to_be_bytes());
        b[16..18].copy_from_slice(&self.protocol.to_be_bytes());
        b[18] = self.lengths.0;
        b[19] = self.lengths.1;
        b[20..22].copy_from_slice(&self.op.to_be_bytes());
        b[22..28].copy_from_slice(&self.sender_mac);
        b[28..32].copy_from_slice(&self.sender_ip.octets());
        b[38..42].copy_from_slice(&self.target_ip.octets());
        // Padding, which the program must leave as it was. (A test run needs more than
        // an Ethernet header: 15 bytes at least.)
        for (i, byte) in b.iter_mut().enumerate().skip(42) {
            *byte = i as u8;
        }
        b.truncate(self.len);
        b
    }
}

/// What the speaker in user space would send for `frame`, had it received it and owned
/// the program's IPs; None: not a request it answers.
fn speakers_answer(frame: &[u8]) -> Option<Vec<u8>> {
    // Received on a link whose MAC is all zeros (the test run's loopback): anything but
    // a group address or that MAC is another host's.
    let to_us = frame[0] & 1 == 1 || frame[..6] == [0; 6];
    let packet = arp::parse(frame).ok()?;
    let ours = |ip: Ipv4Addr| ip == ANSWERED || ip == PROBING;
    let answers = to_us
        && frame.len() >= 42
        && packet.operation == Operation::Request
        && !ours(packet.sender_ip)
        && packet.target_ip == ANSWERED
        && packet.sender_mac != OURS
        && packet.eth_source != OURS;
    answers.then(|| {
        let mut reply = arp::reply(&packet, OURS, packet.target_ip);
        // Answered in place: the request's length and padding.
        reply.truncate(frame.len().min(42));
        reply.extend_from_slice(&frame[42..]);
        reply
    })
}

#[test]
fn a_request_for_an_announced_ip_is_answered_as_the_speaker_answers_it() {
    let loaded = loaded();
    let request = Frame::request(ANSWERED).bytes();
    let (verdict, out) = loaded.run(&request).unwrap();
    assert_eq!(verdict, TCX_REDIRECT, "sent back out of the link");
    assert_eq!(Some(out.clone()), speakers_answer(&request));
    let reply = arp::parse(&out).unwrap();
    assert_eq!(
        (reply.operation, reply.sender_mac, reply.sender_ip),
        (Operation::Reply, OURS, ANSWERED)
    );
    assert_eq!((reply.target_mac, reply.target_ip), (CLIENT, CLIENT_IP));
    assert_eq!(out[..6], CLIENT, "unicast to the requester");
    assert_eq!(loaded.answered().unwrap(), 1, "counted");
}

#[test]
fn what_the_speaker_must_judge_or_does_not_answer_goes_on_unchanged() {
    let loaded = loaded();
    let cases = [
        ("a foreign IP", Frame::request(FOREIGN)),
        ("an IP still probed", Frame::request(PROBING)),
        (
            "a sender claiming one of ours (a gratuitous ARP)",
            Frame {
                sender_ip: ANSWERED,
                ..Frame::request(ANSWERED)
            },
        ),
        (
            "a reply",
            Frame {
                op: 2,
                ..Frame::request(ANSWERED)
            },
        ),
        (
            "unicast to another host",
            Frame {
                destination: [0x02, 0, 0, 0, 0, 0x77],
                ..Frame::request(ANSWERED)
            },
        ),
        (
            "from our own MAC",
            Frame {
                source: OURS,
                sender_mac: OURS,
                ..Frame::request(ANSWERED)
            },
        ),
        (
            "short of the ARP body",
            Frame {
                len: 41,
                ..Frame::request(ANSWERED)
            },
        ),
    ];
    for (what, frame) in cases {
        let bytes = frame.bytes();
        let (verdict, out) = loaded.run(&bytes).unwrap();
        assert_eq!((verdict, &out), (TCX_NEXT, &bytes), "{what}");
    }
    assert_eq!(loaded.answered().unwrap(), 0);
}

#[test]
fn an_expired_lease_leaves_every_request_to_user_space() {
    let loaded = loaded();
    loaded.renew(Duration::ZERO).unwrap();
    let request = Frame::request(ANSWERED).bytes();
    assert_eq!(loaded.run(&request).unwrap(), (TCX_NEXT, request.clone()));
    loaded.renew(Duration::from_secs(60)).unwrap();
    assert_eq!(loaded.run(&request).unwrap().0, TCX_REDIRECT);
}

#[test]
fn an_ip_taken_out_of_the_map_is_no_longer_answered() {
    let loaded = loaded();
    loaded.set(ANSWERED, None).unwrap();
    let request = Frame::request(ANSWERED).bytes();
    assert_eq!(loaded.run(&request).unwrap().0, TCX_NEXT);
}

fn mac() -> impl Strategy<Value = [u8; 6]> {
    prop_oneof![
        Just(BROADCAST),
        Just(CLIENT),
        Just(OURS),
        Just([0; 6]),
        Just([0x01, 0, 0x5e, 0, 0, 1]),
        any::<[u8; 6]>()
    ]
}

fn ip() -> impl Strategy<Value = Ipv4Addr> {
    prop_oneof![
        Just(ANSWERED),
        Just(PROBING),
        Just(FOREIGN),
        Just(CLIENT_IP),
        Just(Ipv4Addr::UNSPECIFIED),
        any::<u32>().prop_map(Ipv4Addr::from)
    ]
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        (
            mac(),
            mac(),
            prop_oneof![Just(0x0806u16), Just(0x0800), any::<u16>()],
        ),
        (
            prop_oneof![Just(1u16), any::<u16>()],
            prop_oneof![Just(0x0800u16), Just(0x86dd)],
            prop_oneof![Just((6u8, 4u8)), Just((6, 16)), Just((8, 4))],
            prop_oneof![Just(1u16), Just(2), any::<u16>()],
        ),
        (
            mac(),
            ip(),
            ip(),
            prop_oneof![Just(60usize), Just(42), 15..80usize],
        ),
    )
        .prop_map(
            |(
                (destination, source, ethertype),
                (hardware, protocol, lengths, op),
                (sender_mac, sender_ip, target_ip, len),
            )| Frame {
                destination,
                source,
                ethertype,
                hardware,
                protocol,
                lengths,
                op,
                sender_mac,
                sender_ip,
                target_ip,
                // A test run refuses an IP frame shorter than an IP header.
                len: if matches!(ethertype, 0x0800 | 0x86dd) {
                    len.max(54)
                } else {
                    len
                },
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// The kernel answers exactly the frames the speaker would answer, with the
    /// speaker's answer, and leaves every other frame untouched.
    #[test]
    fn the_kernel_answers_what_the_speaker_would_and_nothing_else(frame in frame()) {
        static LOADED: LazyLock<Loaded> = LazyLock::new(loaded);
        let loaded = &*LOADED;
        let bytes = frame.bytes();
        let (verdict, out) = loaded.run(&bytes).unwrap();
        match speakers_answer(&bytes) {
            Some(answer) => prop_assert_eq!((verdict, out), (TCX_REDIRECT, answer)),
            None => prop_assert_eq!((verdict, out), (TCX_NEXT, bytes)),
        }
    }
}
