//! Encrypted service flows: the kernel's side of the mTLS path.
//!
//! A connect to a service flagged [`crate::service::SERVICE_FLAG_MTLS`] is balanced as usual,
//! then sent to the local agent's outbound listener instead of the backend. The kernel keeps
//! what the agent needs to carry the flow on:
//!
//! 1. `connect4/6` records an [`OriginalDest`] under the client socket's cookie
//!    ([`crate::maps::REDIRECT_BY_COOKIE`]); the source port is not chosen yet.
//! 2. `sock_ops`, on the client's established callback, moves the record to the client's
//!    address and port ([`crate::maps::REDIRECT_BY_PEER`]), which is what the agent sees as the
//!    peer of the connection it accepts.
//! 3. The agent looks the record up by that peer address, deletes it and tunnels the flow.
//!
//! On the backend's node a `cgroup_skb/ingress` program drops a connection opening (SYN) to a
//! strict service's backend port ([`crate::maps::STRICT_INBOUND`]) unless the agent sent it:
//! the agent marks every socket it opens with [`AGENT_MARK`], and the mark travels with the
//! packets over loopback. The same mark makes the balancing hooks skip the agent's sockets.

/// `SO_MARK` of every socket the agent opens. The hooks leave such sockets alone, and only
/// such sockets may open connections to a strict service's backends.
pub const AGENT_MARK: u32 = 0x6d65_7368; // "mesh"

/// Index, in the settings array, of the agent's outbound listener port (host byte order) on
/// loopback; 0 while no agent set it, and then mTLS connects are refused (fail closed).
pub const SETTING_OUTBOUND_PORT: u32 = 2;

/// Default port of the outbound listener (loopback).
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// Default port of the inbound mTLS listener.
pub const DEFAULT_INBOUND_PORT: u16 = 15008;

/// An address and port as the maps store them (network byte order, IPv4 in word 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 20);

/// Where a redirected connection was really going, and who opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDest {
    /// The backend the kernel chose, network byte order.
    pub backend: [u32; 4],
    /// Backend port, network byte order.
    pub backend_port: u16,
    /// `FAMILY_V4` or `FAMILY_V6` of the backend.
    pub family: u8,
    pub _pad: u8,
    /// The kernel service id (the agent names it).
    pub service_id: u32,
    /// Cgroup id of the process that connected: the workload's identity on this host.
    pub cgroup_id: u64,
}
const _: () = assert!(core::mem::size_of::<OriginalDest>() == 32);
