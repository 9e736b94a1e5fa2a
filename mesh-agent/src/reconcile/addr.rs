//! Addresses and ports as the kernel maps hold them, and back.
//!
//! This module owns the one place where a `std::net` address becomes the four network-order
//! words of [`mesh_common::service`] (and where the status table turns them back into text). The
//! words hold the address octets in their in-memory bytes, exactly as `cgroup/connect*` sees
//! `user_ip4`/`user_ip6`: IPv4 in word 0 (the rest zero), IPv6 as four words of four octets.
//! Ports are stored with `u16::to_be`. Protocols and affinities become their numbers and flag
//! bits here too. Nothing here knows about services or reconciling.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_common::redirect::SockKey;
use mesh_common::service::{
    Backend, ServiceKey, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, SERVICE_FLAG_AFFINITY_CGROUP,
    SERVICE_FLAG_AFFINITY_NETNS,
};

use crate::model::{Affinity, Frontend, Protocol};

/// A map entry carried an address family that is neither [`FAMILY_V4`] nor [`FAMILY_V6`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown address family {0} (expected {FAMILY_V4} or {FAMILY_V6})")]
pub struct BadFamily(pub u8);

/// The kernel words and family of `ip`.
pub fn encode_ip(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([word(0), word(4), word(8), word(12)], FAMILY_V6)
        }
    }
}

/// The address held in kernel words `addr` of family `family`.
pub fn decode_ip(addr: [u32; 4], family: u8) -> Result<IpAddr, BadFamily> {
    match family {
        FAMILY_V4 => Ok(IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()))),
        FAMILY_V6 => {
            let mut octets = [0u8; 16];
            for (chunk, word) in octets.chunks_exact_mut(4).zip(addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        other => Err(BadFamily(other)),
    }
}

/// A host-order port as the maps hold it (network byte order).
pub const fn encode_port(port: u16) -> u16 {
    port.to_be()
}

/// A port from the maps (network byte order) in host order.
pub const fn decode_port(port: u16) -> u16 {
    u16::from_be(port)
}

/// The IP protocol number the kernel keys services by.
pub const fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

/// The `SERVICE_FLAG_AFFINITY_*` bits of an affinity.
pub const fn affinity_flags(affinity: Affinity) -> u32 {
    match affinity {
        Affinity::None => 0,
        Affinity::Cgroup => SERVICE_FLAG_AFFINITY_CGROUP,
        Affinity::Netns => SERVICE_FLAG_AFFINITY_NETNS,
    }
}

/// The map key of a frontend.
pub fn frontend_key(frontend: Frontend) -> ServiceKey {
    service_key(
        frontend.vip,
        frontend.port,
        protocol_number(frontend.protocol),
    )
}

/// The frontend key of a service at `vip:port` speaking `proto` ([`PROTO_TCP`]/[`PROTO_UDP`]).
pub fn service_key(vip: IpAddr, port: u16, proto: u8) -> ServiceKey {
    let (addr, family) = encode_ip(vip);
    ServiceKey {
        addr,
        port: encode_port(port),
        proto,
        family,
    }
}

/// True when `key` is a VIP marker rather than a service (port and protocol are both 0).
pub const fn is_vip_marker_key(key: &ServiceKey) -> bool {
    key.port == 0 && key.proto == 0
}

/// VIP, host-order port and protocol number of a frontend key.
pub fn decode_service_key(key: &ServiceKey) -> Result<(IpAddr, u16, u8), BadFamily> {
    Ok((
        decode_ip(key.addr, key.family)?,
        decode_port(key.port),
        key.proto,
    ))
}

/// The backend entry for `addr`, owned by service `service_id`.
pub fn backend(addr: SocketAddr, service_id: u32) -> Backend {
    let (words, family) = encode_ip(addr.ip());
    Backend {
        addr: words,
        port: encode_port(addr.port()),
        family,
        _pad: 0,
        service_id,
    }
}

/// Where a backend entry points.
pub fn decode_backend(backend: &Backend) -> Result<SocketAddr, BadFamily> {
    Ok(SocketAddr::new(
        decode_ip(backend.addr, backend.family)?,
        decode_port(backend.port),
    ))
}

/// The map key of a socket address (strict backends, connect outcomes, redirected peers).
pub fn sock_key(addr: SocketAddr) -> SockKey {
    let (words, family) = encode_ip(addr.ip());
    SockKey {
        addr: words,
        port: encode_port(addr.port()),
        family,
        _pad: 0,
    }
}

/// The socket address a map key holds.
pub fn decode_sock_key(key: &SockKey) -> Result<SocketAddr, BadFamily> {
    Ok(SocketAddr::new(
        decode_ip(key.addr, key.family)?,
        decode_port(key.port),
    ))
}

/// Displays a frontend key as `10.96.0.10:80/tcp`, `[fd00::10]:53/udp` or `10.96.0.10 (VIP)`.
pub struct DisplayKey<'a>(pub &'a ServiceKey);

impl fmt::Display for DisplayKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key = self.0;
        match decode_service_key(key) {
            Err(e) => write!(f, "<{e}>"),
            Ok((ip, _, _)) if is_vip_marker_key(key) => write!(f, "{ip} (VIP)"),
            Ok((ip, port, proto)) => {
                write!(f, "{}/{}", SocketAddr::new(ip, port), proto_name(proto))
            }
        }
    }
}

/// `tcp`, `udp`, or the protocol number for anything else.
pub fn proto_name(proto: u8) -> ProtoName {
    ProtoName(proto)
}

/// See [`proto_name`].
pub struct ProtoName(u8);

impl fmt::Display for ProtoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            PROTO_TCP => f.write_str("tcp"),
            PROTO_UDP => f.write_str("udp"),
            other => write!(f, "proto{other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_words_hold_network_order_octets() {
        let (addr, family) = encode_ip("10.96.0.10".parse().unwrap());
        assert_eq!(family, FAMILY_V4);
        assert_eq!(addr[0].to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(&addr[1..], &[0, 0, 0]);
    }

    #[test]
    fn ipv6_words_hold_network_order_octets() {
        let ip: IpAddr = "fd00:1:2:3::a".parse().unwrap();
        let (addr, family) = encode_ip(ip);
        assert_eq!(family, FAMILY_V6);
        assert_eq!(addr[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x01]);
        assert_eq!(addr[3].to_ne_bytes(), [0, 0, 0, 0x0a]);
    }

    #[test]
    fn round_trips() {
        for text in [
            "10.200.0.2:8080",
            "[fd00::2]:443",
            "127.0.0.1:1",
            "[::1]:65535",
        ] {
            let sa: SocketAddr = text.parse().unwrap();
            let be = backend(sa, 7);
            assert_eq!(be.service_id, 7);
            assert_eq!(decode_backend(&be).unwrap(), sa);
            let key = service_key(sa.ip(), sa.port(), PROTO_UDP);
            assert_eq!(
                decode_service_key(&key).unwrap(),
                (sa.ip(), sa.port(), PROTO_UDP)
            );
        }
    }

    #[test]
    fn port_is_big_endian_in_memory() {
        assert_eq!(encode_port(80).to_ne_bytes(), [0, 80]);
        assert_eq!(decode_port(encode_port(8080)), 8080);
    }

    #[test]
    fn markers_and_display() {
        let vip: IpAddr = "10.96.0.10".parse().unwrap();
        let (addr, family) = encode_ip(vip);
        let marker = ServiceKey::vip_marker(addr, family);
        assert!(is_vip_marker_key(&marker));
        assert_eq!(DisplayKey(&marker).to_string(), "10.96.0.10 (VIP)");
        let key = service_key(vip, 80, PROTO_TCP);
        assert!(!is_vip_marker_key(&key));
        assert_eq!(DisplayKey(&key).to_string(), "10.96.0.10:80/tcp");
        assert_eq!(decode_ip([0; 4], 9), Err(BadFamily(9)));
    }
}
