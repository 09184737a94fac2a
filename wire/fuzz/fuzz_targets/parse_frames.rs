//! Feeds arbitrary bytes to the ARP and NDP parsers: a speaker must never crash on a
//! frame. Whatever parses must also survive being answered.
#![no_main]

use ferrolb_wire::{arp, ndp};
use libfuzzer_sys::fuzz_target;

const OUR_MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x00, 0x01];

fuzz_target!(|frame: &[u8]| {
    if let Ok(request) = arp::parse(frame) {
        let answer = arp::reply(&request, OUR_MAC, request.target_ip);
        assert!(arp::parse(&answer).is_ok(), "our own ARP reply must parse");
    }
    if let Ok(ns) = ndp::parse(frame) {
        let answer = ndp::advertisement_for(&ns, OUR_MAC, ns.target);
        assert!(ndp::parse(&answer).is_ok(), "our own NA must parse");
    }
});
