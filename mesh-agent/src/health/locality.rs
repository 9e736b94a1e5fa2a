//! Which backends are on this node, for `locality = "prefer-local"`.
//!
//! A backend is local when its IP is one of the addresses of the agent's network namespace.
//! The kernel answers that exactly: binding a socket to an address succeeds only when the
//! address is local (`EADDRNOTAVAIL` otherwise), which also covers all of `127.0.0.0/8` and
//! addresses added after the agent started, without parsing interface lists.

use std::net::{IpAddr, SocketAddr, UdpSocket};

/// Whether `ip` is an address of this network namespace.
pub fn is_local(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_local_and_documentation_addresses_are_not() {
        assert!(is_local("127.0.0.1".parse().unwrap()));
        assert!(is_local("127.0.0.2".parse().unwrap()));
        assert!(!is_local("192.0.2.1".parse().unwrap()));
        assert!(!is_local("2001:db8::1".parse().unwrap()));
    }
}
