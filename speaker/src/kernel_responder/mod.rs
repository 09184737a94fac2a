//! ARP answered in the kernel: for the IPs a link announces, a tc program on the link's
//! ingress answers requests itself, in the softirq that received them, as the kernel
//! answers for its own addresses. The speaker's user-space answer costs a wake-up, a
//! copy and a send per request (about 16× the kernel's time); this one costs neither.
//!
//! Why a tc program and not the kernel's own ARP (the VIP on the link, as keepalived and
//! kube-vip do, or proxy-ARP entries): those outlive the speaker, so a speaker that
//! crashes leaves its node answering for IPs another node has taken. The program is
//! attached by a BPF link held only by the speaker's descriptor: when the process ends,
//! however it ends, the kernel detaches it. A VIP on the link would also expose the
//! node's own listening ports on it, and proxy-ARP needs forwarding and a route per VIP.
//!
//! The speaker keeps its user-space path and everything but the answer itself: probes,
//! gratuitous ARP, conflicts (the program passes every frame whose sender claims one of
//! the link's IPs), IPs still probed or in conflict (in the map, not answering), IPv6,
//! and every IP when the program cannot be loaded (a kernel before 6.6, without tcx; no
//! CAP_BPF and CAP_NET_ADMIN; a full map), which the speaker logs once per link.
//!
//! The map is the program's only input from user space; the wire gives it frames, which
//! it reads only after checking their length, and whose answers it only ever sends back
//! out of the link they came from.

pub mod bpf;
pub mod program;

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use std::time::Duration;

use nix::libc;
use program::{ANSWERED, ENTRY_SIZE, Entry, LEASE_UNTIL, STATE_SLOTS};

/// Bound of the IPs one link's map holds (allocated as inserted). Past it, the others
/// are answered in user space.
pub const MAX_IPS: u32 = 1 << 20;

/// The program and its maps, loaded but not attached.
pub struct Loaded {
    ips: OwnedFd,
    state: OwnedFd,
    program: OwnedFd,
}

impl Loaded {
    pub fn load() -> io::Result<Loaded> {
        let ips = bpf::create_map(
            bpf::BPF_MAP_TYPE_HASH,
            4,
            ENTRY_SIZE,
            MAX_IPS,
            bpf::BPF_F_NO_PREALLOC,
        )?;
        let state = bpf::create_map(bpf::BPF_MAP_TYPE_ARRAY, 4, 8, STATE_SLOTS, 0)?;
        let insns = program::arp_responder(ips.as_raw_fd(), state.as_raw_fd());
        let program = bpf::load_classifier("ferrolb_arp", &insns)?;
        Ok(Loaded {
            ips,
            state,
            program,
        })
    }

    /// Sets what the program knows of `ip`; None: not one of the link's.
    pub fn set(&self, ip: Ipv4Addr, entry: Option<Entry>) -> io::Result<()> {
        let key = ip.octets();
        match entry {
            Some(entry) => bpf::update(&self.ips, &key, &entry.encode()),
            None => bpf::delete(&self.ips, &key),
        }
    }

    /// Requests answered since the program was loaded.
    pub fn answered(&self) -> io::Result<u64> {
        let mut value = [0u8; 8];
        bpf::lookup(&self.state, &ANSWERED.to_ne_bytes(), &mut value)?;
        Ok(u64::from_ne_bytes(value))
    }

    /// Lets the program answer for `lease` from now (and no longer, unless renewed).
    pub fn renew(&self, lease: Duration) -> io::Result<()> {
        let until = monotonic_ns().saturating_add(lease.as_nanos() as u64);
        bpf::update(
            &self.state,
            &LEASE_UNTIL.to_ne_bytes(),
            &until.to_ne_bytes(),
        )
    }

    /// Runs the program once on `frame` (see [`bpf::test_run`]).
    pub fn run(&self, frame: &[u8]) -> io::Result<(i32, Vec<u8>)> {
        bpf::test_run(&self.program, frame)
    }
}

/// `CLOCK_MONOTONIC` in ns, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write into; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

/// How long the program may answer without hearing from the speaker. Two renewals
/// ([`RENEW_EVERY`]) may be late on a loaded machine before requests fall back to user
/// space; a hung speaker stops answering in the kernel about when membership gives its
/// IPs to another node (150 to 300 ms), so two nodes do not answer for long.
pub const LEASE: Duration = Duration::from_millis(300);
pub const RENEW_EVERY: Duration = Duration::from_millis(100);

/// The responder attached to one link, and what its map holds.
pub struct KernelResponder {
    loaded: Loaded,
    _link: OwnedFd,
    mac: [u8; 6],
    entries: HashMap<Ipv4Addr, bool>,
    /// Answers already counted in the metrics.
    counted: u64,
}

impl KernelResponder {
    /// Loads the program and attaches it to link `ifindex`, whose MAC is `mac`.
    pub fn attach(ifindex: u32, mac: [u8; 6]) -> io::Result<KernelResponder> {
        let loaded = Loaded::load()?;
        loaded.renew(LEASE)?;
        let link = bpf::attach_tcx_ingress(&loaded.program, ifindex)?;
        Ok(KernelResponder {
            loaded,
            _link: link,
            mac,
            entries: HashMap::new(),
            counted: 0,
        })
    }

    /// Makes the map say that `ip` is the link's and answered (`Some(true)`), the link's
    /// but left to the speaker (`Some(false)`), or not the link's (None). An IP the map
    /// cannot take is left out, so the speaker answers it.
    pub fn set(&mut self, ip: Ipv4Addr, answering: Option<bool>) -> io::Result<()> {
        if self.entries.get(&ip).copied() == answering {
            return Ok(());
        }
        let entry = answering.map(|answering| Entry {
            mac: self.mac,
            answering,
        });
        match self.loaded.set(ip, entry) {
            Ok(()) => {
                match answering {
                    Some(a) => self.entries.insert(ip, a),
                    None => self.entries.remove(&ip),
                };
                Ok(())
            }
            Err(e) => {
                let _ = self.loaded.set(ip, None);
                self.entries.remove(&ip);
                Err(e)
            }
        }
    }

    /// Lets the program go on answering for [`LEASE`].
    pub fn renew(&self) -> io::Result<()> {
        self.loaded.renew(LEASE)
    }

    /// Answers given since the last call.
    pub fn newly_answered(&mut self) -> io::Result<u64> {
        let total = self.loaded.answered()?;
        let new = total.saturating_sub(self.counted);
        self.counted = total;
        Ok(new)
    }
}
