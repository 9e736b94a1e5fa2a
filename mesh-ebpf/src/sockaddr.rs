//! Reading and writing the destination of a `bpf_sock_addr` context, per address family.
//!
//! The context exposes the user's address as `user_ip4` / `user_ip6` (network byte order) and
//! `user_port` (the network-order port in the low 16 bits). [`Dest`] holds them in the same
//! encoding as the map keys, so lookups need no conversion.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::programs::{SockAddrContext, SockContext};
use mesh_common::service::{FAMILY_V4, FAMILY_V6};

/// An address and port as the maps store them.
#[derive(Clone, Copy)]
pub struct Dest {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u8,
}

/// The IP protocol of the socket (`IPPROTO_TCP`, `IPPROTO_UDP`, ...).
#[inline(always)]
pub fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: the kernel hands every cgroup/sock_addr program a valid context.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "IP protocol numbers are 8 bits"
    )]
    unsafe {
        (*ctx.sock_addr).protocol as u8
    }
}

#[expect(
    clippy::cast_possible_truncation,
    reason = "user_port keeps the port in 16 bits"
)]
#[inline(always)]
fn port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as in `protocol`.
    unsafe { (*ctx.sock_addr).user_port as u16 }
}

/// The IPv4 destination (connect4, sendmsg4) or peer (getpeername4, recvmsg4).
#[inline(always)]
pub fn read_v4(ctx: &SockAddrContext) -> Dest {
    // SAFETY: as in `protocol`.
    let ip = unsafe { (*ctx.sock_addr).user_ip4 };
    Dest {
        addr: [ip, 0, 0, 0],
        port: port(ctx),
        family: FAMILY_V4,
    }
}

/// The IPv6 destination or peer. The verifier only allows 4-byte reads of `user_ip6`.
#[inline(always)]
pub fn read_v6(ctx: &SockAddrContext) -> Dest {
    // SAFETY: as in `protocol`.
    let addr = unsafe {
        let sa = ctx.sock_addr;
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    };
    Dest {
        addr,
        port: port(ctx),
        family: FAMILY_V6,
    }
}

/// Overwrites the IPv4 destination (or the peer shown to the user) with `dest`.
///
/// The v4 and v6 writers are separate because the verifier rejects any access to
/// `user_ip6` from a v4 hook ("invalid bpf_context access off=20"), even on a branch that
/// never runs.
#[inline(always)]
pub fn write_v4(ctx: &SockAddrContext, dest: &Dest) {
    // SAFETY: as in `protocol`; these fields are writable in every v4 hook we use.
    unsafe {
        let sa = ctx.sock_addr;
        (*sa).user_ip4 = dest.addr[0];
        (*sa).user_port = u32::from(dest.port);
    }
}

/// Overwrites the IPv6 destination (or peer) with `dest`; 4-byte writes only.
#[inline(always)]
pub fn write_v6(ctx: &SockAddrContext, dest: &Dest) {
    // SAFETY: as in `protocol`; these fields are writable in every v6 hook we use.
    unsafe {
        let sa = ctx.sock_addr;
        (*sa).user_ip6[0] = dest.addr[0];
        (*sa).user_ip6[1] = dest.addr[1];
        (*sa).user_ip6[2] = dest.addr[2];
        (*sa).user_ip6[3] = dest.addr[3];
        (*sa).user_port = u32::from(dest.port);
    }
}

/// `AF_INET`.
const AF_INET: u32 = 2;
/// `AF_INET6`.
const AF_INET6: u32 = 10;

/// The connected peer of a socket (`cgroup/sock_release`), if it has one.
///
/// Every field is read up front, at its fixed offset: reading inside the family branches let
/// LLVM compute one shared field pointer, which the verifier rejects ("dereference of modified
/// ctx ptr R2 off=52 disallowed").
#[inline(always)]
pub fn peer_of(ctx: &SockContext) -> Option<Dest> {
    let sk = ctx.sock;
    // SAFETY: the kernel hands every cgroup/sock program a valid socket; family, dst_port and
    // the dst address fields are readable in sock_release (4-byte reads of dst_ip6). Volatile
    // reads keep each access a separate load from the context.
    let (family, port, ip4, ip6) = unsafe {
        (
            read_volatile(addr_of!((*sk).family)),
            read_volatile(addr_of!((*sk).dst_port)),
            read_volatile(addr_of!((*sk).dst_ip4)),
            [
                read_volatile(addr_of!((*sk).dst_ip6[0])),
                read_volatile(addr_of!((*sk).dst_ip6[1])),
                read_volatile(addr_of!((*sk).dst_ip6[2])),
                read_volatile(addr_of!((*sk).dst_ip6[3])),
            ],
        )
    };
    if port == 0 {
        return None;
    }
    from_parts(family, ip4, ip6, port)
}

/// The address of a socket from its fields as the kernel exposes them (`AF_*` family, both
/// address fields, the port in network order); `None` for a family that is not IP.
#[inline(always)]
pub fn from_parts(af: u32, ip4: u32, ip6: [u32; 4], port: u16) -> Option<Dest> {
    let family = family_of(af)?;
    let addr = if family == FAMILY_V4 {
        [ip4, 0, 0, 0]
    } else {
        ip6
    };
    Some(Dest { addr, port, family })
}

/// The maps' family code for a socket family (`AF_INET`/`AF_INET6`), if it is IP.
#[inline(always)]
fn family_of(af: u32) -> Option<u8> {
    match af {
        AF_INET => Some(FAMILY_V4),
        AF_INET6 => Some(FAMILY_V6),
        _ => None,
    }
}
