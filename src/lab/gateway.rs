//! Services of the machine, reachable from the lab's hosts: a TCP relay listening on the
//! switch's own address, [`GATEWAY_IPV4`], that forwards each connection to a socket on
//! the machine's loopback. This is how speakers in node namespaces reach a test's API
//! server over the lab's network, as a real node reaches its control plane, while
//! nothing is added to the machine's own namespace.

use std::fs::File;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sched::{CloneFlags, setns};

use super::{IPV4_PREFIX_LEN, Lab, host_ipv4, sys};

/// The lab switch's address: where lab hosts reach relayed services.
pub const GATEWAY_IPV4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

/// A relay made by [`Lab::relay`]; stops listening when dropped.
#[derive(Debug)]
pub struct Relay {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Where lab hosts connect: `192.0.2.1:PORT`.
    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Lab {
    /// Makes `target` (on the machine's loopback) reachable from every lab host at
    /// [`GATEWAY_IPV4`]`:port`. The switch gets that address on its bridge the first
    /// time; hosts reach it directly on their segment.
    pub fn relay(&self, port: u16, target: SocketAddr) -> Result<Relay> {
        debug_assert_eq!(GATEWAY_IPV4, host_ipv4(1));
        sys::ip_batch(
            "gateway",
            Some(&self.switch_netns),
            true,
            &[format!(
                "addr replace {GATEWAY_IPV4}/{IPV4_PREFIX_LEN} dev {}",
                self.bridge
            )],
        )?;
        let address = SocketAddr::from((GATEWAY_IPV4, port));
        let listener = listen_in(&self.switch_netns, address)
            .with_context(|| format!("listening on {address} in {}", self.switch_netns))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("relay {address}"))
            .spawn(move || accept_loop(listener, target, &stopped))?;
        Ok(Relay {
            address,
            stop,
            thread: Some(thread),
        })
    }
}

/// A listener created inside `netns` (sockets keep the namespace they were made in),
/// made on a short-lived thread so that no other thread ever changes namespace.
fn listen_in(netns: &str, address: SocketAddr) -> Result<TcpListener> {
    let path = format!("{}/{netns}", sys::NETNS_DIR);
    let ns = File::open(&path).with_context(|| format!("opening {path}"))?;
    std::thread::scope(|s| {
        s.spawn(|| -> Result<TcpListener> {
            setns(&ns, CloneFlags::CLONE_NEWNET).context("entering the switch namespace")?;
            Ok(TcpListener::bind(address)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the listening thread panicked"))?
    })
}

fn accept_loop(listener: TcpListener, target: SocketAddr, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((inbound, _)) => {
                let _ = std::thread::Builder::new()
                    .name("relay connection".into())
                    .spawn(move || relay_connection(inbound, target));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Copies both ways until either side closes; a refused target closes the inbound side,
/// as a stopped server would.
fn relay_connection(inbound: TcpStream, target: SocketAddr) {
    let _ = inbound.set_nonblocking(false);
    let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
        let _ = inbound.shutdown(Shutdown::Both);
        return;
    };
    let (Ok(mut in_read), Ok(mut out_write)) = (inbound.try_clone(), outbound.try_clone()) else {
        return;
    };
    let upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut in_read, &mut out_write);
        let _ = out_write.shutdown(Shutdown::Write);
    });
    let (mut out_read, mut in_write) = (outbound, inbound);
    let _ = std::io::copy(&mut out_read, &mut in_write);
    let _ = in_write.shutdown(Shutdown::Both);
    let _ = upstream.join();
}
