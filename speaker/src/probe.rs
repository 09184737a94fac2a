//! Asking the wire whether addresses are in use before a `fromNodeNetwork` pool takes
//! them: RFC 5227 ARP probes (IPv4) and RFC 4862 duplicate address detection (IPv6),
//! sent from this node; whoever answers within the wait has the address.
//!
//! Each answer is parsed by the same checked parsers the responder uses, so a hostile
//! frame can at worst make the pool skip an address.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::interfaces::Link;
use crate::ndp::NdpKind;
use crate::packet_socket::{ETH_P_ARP, ETH_P_IPV6, PacketSocket, arp_filter, ndp_filter};
use crate::{arp, ndp};

/// Probes are sent this many times, this far apart (RFC 5227 sends 3, 1–2 s apart; a pool
/// resolved once at install needs no more than a lossy moment's worth of repeats).
const ROUNDS: usize = 3;
const BETWEEN: Duration = Duration::from_millis(200);
/// The most answers read in one probe: a flood cannot keep the resolver busy.
const MAX_FRAMES: usize = 10_000;

/// The addresses of `addresses` that another host answered for on `link`, with the MAC
/// that answered.
pub async fn in_use(
    link: &Link,
    addresses: &[IpAddr],
    wait: Duration,
) -> io::Result<BTreeMap<IpAddr, [u8; 6]>> {
    let mac = link.mac.ok_or_else(|| {
        io::Error::other(format!("interface {} has no Ethernet address", link.name))
    })?;
    let (mut v4, mut v6) = (BTreeSet::<Ipv4Addr>::new(), BTreeSet::<Ipv6Addr>::new());
    for ip in addresses {
        match ip {
            IpAddr::V4(a) => v4.insert(*a),
            IpAddr::V6(a) => v6.insert(*a),
        };
    }
    // Open before sending, so no answer is missed.
    let arp_socket = match v4.is_empty() {
        true => None,
        false => Some(PacketSocket::open(link.index, ETH_P_ARP, &arp_filter())?),
    };
    let ndp_socket = match v6.is_empty() {
        true => None,
        false => Some(PacketSocket::open(link.index, ETH_P_IPV6, &ndp_filter())?),
    };
    let mut found = BTreeMap::new();
    let listen = async {
        let mut arp_buf = [0u8; 1514];
        let mut ndp_buf = [0u8; 1514];
        for _ in 0..MAX_FRAMES {
            tokio::select! {
                n = recv(&arp_socket, &mut arp_buf) => {
                    let n = n?;
                    if let Ok(p) = arp::parse(&arp_buf[..n])
                        && v4.contains(&p.sender_ip)
                        && p.sender_mac != mac
                    {
                        found.insert(IpAddr::V4(p.sender_ip), p.sender_mac);
                    }
                }
                n = recv(&ndp_socket, &mut ndp_buf) => {
                    let n = n?;
                    if let Ok(p) = ndp::parse(&ndp_buf[..n])
                        && let NdpKind::Advertisement { target_lladdr, .. } = p.kind
                        && v6.contains(&p.target)
                        && p.eth_source != mac
                    {
                        found.insert(IpAddr::V6(p.target), target_lladdr.unwrap_or(p.eth_source));
                    }
                }
            }
        }
        Ok::<(), io::Error>(())
    };
    let send = async {
        for round in 0..ROUNDS {
            if round > 0 {
                tokio::time::sleep(BETWEEN).await;
            }
            if let Some(s) = &arp_socket {
                for ip in &v4 {
                    s.send(&arp::probe(mac, *ip)).await?;
                }
            }
            if let Some(s) = &ndp_socket {
                for ip in &v6 {
                    s.send(&ndp::solicitation(*ip, mac, Ipv6Addr::UNSPECIFIED))
                        .await?;
                }
            }
        }
        tokio::time::sleep(wait).await;
        Ok::<(), io::Error>(())
    };
    tokio::select! {
        r = send => r?,
        r = listen => r?,
    }
    Ok(found)
}

async fn recv(socket: &Option<PacketSocket>, buf: &mut [u8]) -> io::Result<usize> {
    match socket {
        Some(s) => s.recv(buf).await,
        None => std::future::pending().await,
    }
}
