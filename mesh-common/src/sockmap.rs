//! The loopback hop between an application and the agent, short-circuited with a sockmap.
//!
//! An mTLS flow crosses loopback TCP once on its way into the tunnel: the application's socket
//! is connected to the agent's outbound listener on `127.0.0.1` (or `[::1]`). When the agent
//! turns [`SETTING_LOOPBACK_SOCKMAP`] on, `sock_ops` puts both ends of that hop into the
//! sockhash [`crate::maps::LOOPBACK_SOCKETS`] once established, keyed by their own
//! [`SockTuple`], and an `sk_msg` program moves each message a socket sends straight onto the
//! receive queue of the socket under the reversed tuple (its peer), skipping the loopback TCP
//! stack. Sockets leave the map by themselves when they close.

/// Index, in the settings array, of the switch for the loopback sockmap (0 off, 1 on).
pub const SETTING_LOOPBACK_SOCKMAP: u32 = 3;

/// A socket's own connection, as the kernel shows it: local and remote address and port
/// (network byte order, IPv4 in word 0). The peer of a loopback socket is the one whose tuple
/// is this one reversed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockTuple {
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
    /// Network byte order.
    pub local_port: u16,
    /// Network byte order.
    pub remote_port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<SockTuple>() == 40);

impl SockTuple {
    /// The tuple of the other end of this connection.
    #[inline(always)]
    #[must_use]
    pub const fn reversed(&self) -> SockTuple {
        SockTuple {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            family: self.family,
            _pad: [0; 3],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::SockTuple;

    #[test]
    fn reversing_twice_is_the_same_tuple() {
        let t = SockTuple {
            local_addr: [1, 0, 0, 0],
            remote_addr: [2, 0, 0, 0],
            local_port: 3,
            remote_port: 4,
            family: 4,
            _pad: [0; 3],
        };
        let r = t.reversed();
        assert_eq!((r.local_addr[0], r.local_port, r.remote_port), (2, 4, 3));
        assert_eq!(r.reversed(), t);
    }
}
