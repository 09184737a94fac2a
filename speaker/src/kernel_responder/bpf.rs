//! The few `bpf(2)` commands the kernel responder needs, over raw syscalls: create a
//! map, read and write its elements, load a program, attach it to a link's tcx ingress,
//! and run it once on a frame of our choosing (`BPF_PROG_TEST_RUN`, for tests).
//!
//! Every descriptor is an [`OwnedFd`]: closing the link's descriptor detaches the
//! program, so a speaker that exits or crashes leaves nothing answering behind it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;

use super::program::Insn;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;

pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// Hash map elements are allocated when inserted, not all at creation: a large bound
/// costs nothing until used.
pub const BPF_F_NO_PREALLOC: u32 = 1;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;

/// The size of `union bpf_attr` we pass: larger than any command's part we fill; the
/// kernel checks that the bytes past what it knows are zero.
const ATTR_SIZE: usize = 128;

#[repr(C, align(8))]
struct Attr([u8; ATTR_SIZE]);

impl Attr {
    fn new() -> Attr {
        Attr([0; ATTR_SIZE])
    }

    fn u32(&mut self, offset: usize, value: u32) -> &mut Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn u64(&mut self, offset: usize, value: u64) -> &mut Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }

    fn read_u32(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().expect("4 bytes"))
    }
}

fn pointer<T>(p: *const T) -> u64 {
    p as usize as u64
}

/// `bpf(cmd, attr)`; the descriptor or value it returns.
fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, zero-padded buffer of ATTR_SIZE bytes, and every pointer
    // written into it points at memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), ATTR_SIZE) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(rc: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(rc as i32) }
}

pub fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, map_type)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries)
        .u32(16, flags);
    bpf(BPF_MAP_CREATE, &mut attr).map(owned)
}

fn element(map: &OwnedFd, key: &[u8], value: u64) -> Attr {
    let mut attr = Attr::new();
    attr.u32(0, map.as_raw_fd() as u32)
        .u64(8, pointer(key.as_ptr()))
        .u64(16, value);
    attr
}

/// Writes `key` → `value` (whatever was there before).
pub fn update(map: &OwnedFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = element(map, key, pointer(value.as_ptr()));
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// Removes `key`; a key already absent is not an error.
pub fn delete(map: &OwnedFd, key: &[u8]) -> io::Result<()> {
    let mut attr = element(map, key, 0);
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map(drop),
    }
}

/// Reads `key` into `value`; false if it is absent.
pub fn lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = element(map, key, pointer(value.as_mut_ptr()));
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Loads a tc classifier; the verifier's complaint, if it refuses it, is in the error.
pub fn load_classifier(name: &str, program: &[Insn]) -> io::Result<OwnedFd> {
    let code: Vec<u8> = program.iter().flat_map(|i| i.encode()).collect();
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = Attr::new();
    attr.u32(0, BPF_PROG_TYPE_SCHED_CLS)
        .u32(4, program.len() as u32)
        .u64(8, pointer(code.as_ptr()))
        .u64(16, pointer(license.as_ptr()));
    let mut name_bytes = [0u8; 16];
    for (slot, byte) in name_bytes.iter_mut().take(15).zip(name.bytes()) {
        *slot = byte;
    }
    attr.0[48..64].copy_from_slice(&name_bytes);
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(first) => {
            // Again with the verifier's log, which only a refusal needs.
            attr.u32(24, 1)
                .u32(28, log.len() as u32)
                .u64(32, pointer(log.as_mut_ptr()));
            match bpf(BPF_PROG_LOAD, &mut attr) {
                Ok(fd) => Ok(owned(fd)),
                Err(_) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    let text = String::from_utf8_lossy(&log[..end]);
                    let tail: String = text.lines().rev().take(8).collect::<Vec<_>>().join(" | ");
                    Err(io::Error::new(first.kind(), format!("{first}: {tail}")))
                }
            }
        }
    }
}

/// Attaches `program` to the tcx ingress of link `ifindex`, after the programs already
/// there; detached when the returned descriptor is closed.
pub fn attach_tcx_ingress(program: &OwnedFd, ifindex: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.u32(0, program.as_raw_fd() as u32)
        .u32(4, ifindex)
        .u32(8, BPF_TCX_INGRESS);
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Runs `program` once on `frame` in the kernel (as if received on the loopback link of
/// this network namespace) and returns its verdict and the frame as it left it.
pub fn test_run(program: &OwnedFd, frame: &[u8]) -> io::Result<(i32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let mut attr = Attr::new();
    attr.u32(0, program.as_raw_fd() as u32)
        .u32(8, frame.len() as u32)
        .u32(12, out.len() as u32)
        .u64(16, pointer(frame.as_ptr()))
        .u64(24, pointer(out.as_mut_ptr()))
        .u32(32, 1);
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    let verdict = attr.read_u32(4) as i32;
    out.truncate(attr.read_u32(12) as usize);
    Ok((verdict, out))
}
