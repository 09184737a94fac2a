//! The eBPF program that answers ARP for the link's VIPs in the kernel: a tc classifier
//! on the link's ingress that turns a request for an IP marked answering into its reply
//! in place and sends it back out of the link (`bpf_redirect`), before any socket sees
//! the request. Everything else goes on to the stack and the speaker's own sockets.
//!
//! Written as instructions, like the socket filters in [`crate::packet_socket`]: no
//! compiler for the BPF target is needed to build the speaker, and the program is short
//! enough to read whole. Pure: it is only bytes until [`super::bpf`] loads it.
//!
//! The program answers a frame only if every one of these holds, and passes it on
//! (`TCX_NEXT`) otherwise:
//! * at least 42 bytes in the linear head: Ethernet and the ARP body;
//! * addressed to this host (not `PACKET_OTHERHOST`) and carrying no VLAN tag in its
//!   metadata (see [`crate::packet_socket`] for why both matter);
//! * an Ethernet/IPv4 ARP request (hardware type 1, protocol 0x0800, lengths 6 and 4);
//! * its sender IP is none of the link's IPs: a host that claims one of ours (a
//!   gratuitous ARP, a reply to our probe, a request of its own from that address) is a
//!   conflict, judged by the speaker;
//! * its target IP is in the map, marked answering (announced, not probing nor in
//!   conflict);
//! * neither its sender MAC nor its Ethernet source is this link's MAC (our own frames
//!   reflected by the segment);
//! * the speaker's lease ([`LEASE_UNTIL`]) has not run out.
//!
//! The reply is what [`crate::arp::reply`] builds: to the sender's MAC, from the link's
//! MAC, the target IP as sender. The frame keeps its length (a padded request gives a
//! padded reply).

/// The map of the link's IPs: key the IPv4 address as on the wire (4 bytes), value
/// [`Entry`].
pub const ENTRY_SIZE: u32 = 8;
/// The state array, of u64s: requests answered,
pub const ANSWERED: u32 = 0;
/// and until when (`CLOCK_MONOTONIC`, ns) the program may answer: the speaker renews
/// this lease while it runs, so a speaker that hangs (stopped, deadlocked) stops
/// answering in the kernel too, as it would in user space, instead of answering for IPs
/// other nodes took over when membership lost it.
pub const LEASE_UNTIL: u32 = 1;
pub const STATE_SLOTS: u32 = 2;

/// What the map holds for one IP of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub mac: [u8; 6],
    /// Announced: the program answers. False while the IP is probed or in conflict: it
    /// is still one of ours for the sender check, but the speaker decides.
    pub answering: bool,
}

impl Entry {
    pub fn encode(&self) -> [u8; ENTRY_SIZE as usize] {
        let mut value = [0u8; ENTRY_SIZE as usize];
        value[..6].copy_from_slice(&self.mac);
        value[6] = u8::from(self.answering);
        value
    }
}

/// One eBPF instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    pub fn encode(&self) -> [u8; 8] {
        let mut bytes = [0u8; 8];
        bytes[0] = self.code;
        bytes[1] = (self.src << 4) | (self.dst & 0x0f);
        bytes[2..4].copy_from_slice(&self.off.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.imm.to_le_bytes());
        bytes
    }
}

// Registers. r1-r5 are arguments and clobbered by calls; r6-r9 survive them.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;

// Opcodes.
const LDX_W: u8 = 0x61;
const LDX_H: u8 = 0x69;
const LDX_B: u8 = 0x71;
const LDX_DW: u8 = 0x79;
const STX_W: u8 = 0x63;
const STX_H: u8 = 0x6b;
const ST_W: u8 = 0x62;
const ST_H: u8 = 0x6a;
const ATOMIC_DW: u8 = 0xdb;
const MOV64_IMM: u8 = 0xb7;
const MOV64_REG: u8 = 0xbf;
const ADD64_IMM: u8 = 0x07;
const LD_IMM64: u8 = 0x18;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const JNE_REG: u8 = 0x5d;
const JEQ_REG: u8 = 0x1d;
const JGT_REG: u8 = 0x2d;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// `src` of a 64-bit immediate load that names a map by descriptor.
const PSEUDO_MAP_FD: u8 = 1;
const BPF_ADD: i32 = 0;

const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_KTIME_GET_NS: i32 = 5;
const FN_REDIRECT: i32 = 23;

/// `struct __sk_buff` fields.
const SKB_PKT_TYPE: i16 = 4;
const SKB_VLAN_PRESENT: i16 = 20;
const SKB_IFINDEX: i16 = 40;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;
const PACKET_OTHERHOST: i32 = 3;
/// tcx: go on to the next program, then the stack.
pub const TCX_NEXT: i32 = -1;
/// `TC_ACT_REDIRECT`, what `bpf_redirect` returns.
pub const TCX_REDIRECT: i32 = 7;

// Frame offsets (Ethernet header, then the ARP body).
const ETH_DEST: i16 = 0;
const ETH_SOURCE: i16 = 6;
const ETH_TYPE: i16 = 12;
const ARP_HTYPE_PTYPE: i16 = 14;
const ARP_LENGTHS_OP: i16 = 18;
const ARP_OP: i16 = 20;
const ARP_SENDER_MAC: i16 = 22;
const ARP_SENDER_IP: i16 = 28;
const ARP_TARGET_MAC: i16 = 32;
const ARP_TARGET_IP: i16 = 38;
const ARP_FRAME_LEN: i32 = 42;

/// Loaded as little-endian words, as the machine reads the wire's big-endian fields.
/// (eBPF loads in host order; the speaker runs on little-endian machines, and
/// [`arp_responder`] refuses to build on others.)
const ETHERTYPE_ARP: i32 = 0x0608;
const HTYPE_ETHERNET_PTYPE_IPV4: i32 = 0x0008_0100;
const LENGTHS_6_4_OP_REQUEST: i32 = 0x0100_0406;
const OP_REPLY: i32 = 0x0200;

/// Stack slots.
const SLOT_SENDER_IP: i16 = -4;
const SLOT_TARGET_IP: i16 = -8;
const SLOT_STATE_KEY: i16 = -12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Label {
    Pass,
    CheckEthSource,
    Lease,
    Send,
}

/// A program under construction, with jumps to labels resolved at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    jumps: Vec<(usize, Label)>,
    labels: Vec<(Label, usize)>,
}

impl Asm {
    fn op(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            dst,
            src,
            off,
            imm,
        });
    }

    fn load(&mut self, code: u8, dst: u8, base: u8, off: i16) {
        self.op(code, dst, base, off, 0);
    }

    fn store(&mut self, code: u8, base: u8, off: i16, src: u8) {
        self.op(code, base, src, off, 0);
    }

    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.jumps.push((self.insns.len(), to));
        self.op(code, dst, src, 0, imm);
    }

    fn label(&mut self, label: Label) {
        self.labels.push((label, self.insns.len()));
    }

    fn map(&mut self, dst: u8, fd: i32) {
        self.op(LD_IMM64, dst, PSEUDO_MAP_FD, 0, fd);
        self.op(0, 0, 0, 0, 0);
    }

    /// `r0 = lookup(map, r10 + slot)`.
    fn lookup(&mut self, map_fd: i32, slot: i16) {
        self.map(R1, map_fd);
        self.op(MOV64_REG, R2, R10, 0, 0);
        self.op(ADD64_IMM, R2, 0, 0, i32::from(slot));
        self.op(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM);
    }

    /// Copies 6 bytes (a MAC) from `from_base + from` to each `to` in the frame (r7).
    fn copy_mac(&mut self, from_base: u8, from: i16, to: &[i16]) {
        self.load(LDX_W, R1, from_base, from);
        for t in to {
            self.store(STX_W, R7, *t, R1);
        }
        self.load(LDX_H, R1, from_base, from + 4);
        for t in to {
            self.store(STX_H, R7, *t + 4, R1);
        }
    }

    /// Jumps to `to` if the MAC at `off` in the frame is the entry's (r9).
    fn if_our_mac(&mut self, off: i16, otherwise: Label, to: Label) {
        self.load(LDX_W, R1, R7, off);
        self.load(LDX_W, R2, R9, 0);
        self.jump(JNE_REG, R1, R2, 0, otherwise);
        self.load(LDX_H, R1, R7, off + 4);
        self.load(LDX_H, R2, R9, 4);
        self.jump(JEQ_REG, R1, R2, 0, to);
    }

    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in &self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(l, _)| l == to)
                .map(|(_, i)| *i)
                .expect("every label used is placed");
            self.insns[*at].off =
                i16::try_from(target as isize - *at as isize - 1).expect("the program is short");
        }
        self.insns
    }
}

/// The responder for one link, reading its IPs from map `ips_fd` and its lease, and
/// counting answers, in array `state_fd`.
pub fn arp_responder(ips_fd: i32, state_fd: i32) -> Vec<Insn> {
    const {
        assert!(
            cfg!(target_endian = "little"),
            "the program's constants are little-endian"
        )
    };
    let mut a = Asm::default();
    a.op(MOV64_REG, R6, R1, 0, 0);
    a.load(LDX_W, R7, R6, SKB_DATA);
    a.load(LDX_W, R8, R6, SKB_DATA_END);
    a.op(MOV64_REG, R1, R7, 0, 0);
    a.op(ADD64_IMM, R1, 0, 0, ARP_FRAME_LEN);
    a.jump(JGT_REG, R1, R8, 0, Label::Pass);
    a.load(LDX_W, R1, R6, SKB_PKT_TYPE);
    a.jump(JEQ_IMM, R1, 0, PACKET_OTHERHOST, Label::Pass);
    a.load(LDX_W, R1, R6, SKB_VLAN_PRESENT);
    a.jump(JNE_IMM, R1, 0, 0, Label::Pass);
    a.load(LDX_H, R1, R7, ETH_TYPE);
    a.jump(JNE_IMM, R1, 0, ETHERTYPE_ARP, Label::Pass);
    a.load(LDX_W, R1, R7, ARP_HTYPE_PTYPE);
    a.jump(JNE_IMM, R1, 0, HTYPE_ETHERNET_PTYPE_IPV4, Label::Pass);
    a.load(LDX_W, R1, R7, ARP_LENGTHS_OP);
    a.jump(JNE_IMM, R1, 0, LENGTHS_6_4_OP_REQUEST, Label::Pass);
    a.load(LDX_W, R1, R7, ARP_SENDER_IP);
    a.store(STX_W, R10, SLOT_SENDER_IP, R1);
    a.load(LDX_W, R1, R7, ARP_TARGET_IP);
    a.store(STX_W, R10, SLOT_TARGET_IP, R1);
    // A sender claiming one of our IPs is the speaker's to judge.
    a.lookup(ips_fd, SLOT_SENDER_IP);
    a.jump(JNE_IMM, R0, 0, 0, Label::Pass);
    a.lookup(ips_fd, SLOT_TARGET_IP);
    a.jump(JEQ_IMM, R0, 0, 0, Label::Pass);
    a.op(MOV64_REG, R9, R0, 0, 0);
    a.load(LDX_B, R1, R9, 6);
    a.jump(JEQ_IMM, R1, 0, 0, Label::Pass);
    a.if_our_mac(ARP_SENDER_MAC, Label::CheckEthSource, Label::Pass);
    a.label(Label::CheckEthSource);
    a.if_our_mac(ETH_SOURCE, Label::Lease, Label::Pass);
    a.label(Label::Lease);
    a.op(ST_W, R10, 0, SLOT_STATE_KEY, LEASE_UNTIL as i32);
    a.lookup(state_fd, SLOT_STATE_KEY);
    a.jump(JEQ_IMM, R0, 0, 0, Label::Pass);
    a.load(LDX_DW, R8, R0, 0);
    a.op(CALL, 0, 0, 0, FN_KTIME_GET_NS);
    a.jump(JGT_REG, R0, R8, 0, Label::Pass);
    // The sender's MAC becomes the destination and the target MAC; its IP the target
    // IP; ours the source, sender MAC and (the asked-for IP) sender IP.
    a.copy_mac(R7, ARP_SENDER_MAC, &[ETH_DEST, ARP_TARGET_MAC]);
    a.load(LDX_W, R1, R7, ARP_SENDER_IP);
    a.store(STX_W, R7, ARP_TARGET_IP, R1);
    a.copy_mac(R9, 0, &[ETH_SOURCE, ARP_SENDER_MAC]);
    a.load(LDX_W, R1, R10, SLOT_TARGET_IP);
    a.store(STX_W, R7, ARP_SENDER_IP, R1);
    a.op(ST_H, R7, 0, ARP_OP, OP_REPLY);
    a.op(ST_W, R10, 0, SLOT_STATE_KEY, ANSWERED as i32);
    a.lookup(state_fd, SLOT_STATE_KEY);
    a.jump(JEQ_IMM, R0, 0, 0, Label::Send);
    a.op(MOV64_IMM, R1, 0, 0, 1);
    a.op(ATOMIC_DW, R0, R1, 0, BPF_ADD);
    a.label(Label::Send);
    a.load(LDX_W, R1, R6, SKB_IFINDEX);
    a.op(MOV64_IMM, R2, 0, 0, 0);
    a.op(CALL, 0, 0, 0, FN_REDIRECT);
    a.op(EXIT, 0, 0, 0, 0);
    a.label(Label::Pass);
    a.op(MOV64_IMM, R0, 0, 0, TCX_NEXT);
    a.op(EXIT, 0, 0, 0, 0);
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // r1 = *(u32 *)(r6 + 76): code, dst in the low nibble, src in the high one.
        let insn = Insn {
            code: LDX_W,
            dst: R1,
            src: R6,
            off: 76,
            imm: 0,
        };
        assert_eq!(insn.encode(), [0x61, 0x61, 76, 0, 0, 0, 0, 0]);
        let insn = Insn {
            code: MOV64_IMM,
            dst: R0,
            src: 0,
            off: 0,
            imm: -1,
        };
        assert_eq!(insn.encode(), [0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn every_jump_lands_inside_the_program_and_it_ends_in_exit() {
        let program = arp_responder(3, 4);
        for (i, insn) in program.iter().enumerate() {
            if insn.code & 0x07 == 0x05 && insn.code != CALL && insn.code != EXIT {
                let target = i as isize + 1 + insn.off as isize;
                assert!(
                    (0..program.len() as isize).contains(&target),
                    "jump at {i} to {target}"
                );
            }
        }
        assert_eq!(program.last().map(|i| i.code), Some(EXIT));
        // Both maps are named by descriptor in a two-slot load.
        let maps: Vec<i32> = program
            .iter()
            .filter(|i| i.code == LD_IMM64)
            .map(|i| i.imm)
            .collect();
        assert_eq!(maps, vec![3, 3, 4, 4]);
    }
}
