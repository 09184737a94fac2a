//! ARP and IPv6 Neighbor Discovery frames as the speaker reads and writes them on its
//! packet sockets: typed views over byte buffers, every length checked before it is
//! read. Nothing here does I/O, so every frame a network could send can be fed to it —
//! by the unit tests' properties and by the fuzz targets in `fuzz/`.

pub mod arp;
pub mod ndp;
