//! The loopback hop between an application and the agent, short-circuited with a sockmap
//! (see `mesh_common::sockmap`).
//!
//! * [`on_established`] (from `sock_ops`) puts a socket into [`LOOPBACK_SOCKETS`] when it is
//!   one end of a loopback connection to or from the agent's outbound listener, and only while
//!   the agent has [`SETTING_LOOPBACK_SOCKMAP`] on.
//! * [`verdict`] (the `sk_msg` program, attached to that map) sends a message straight to the
//!   ingress of the peer socket, the one under the reversed tuple; a socket whose peer is not
//!   (or no longer) in the map sends through TCP as usual.
//!
//! This module must not touch any other socket: everything else keeps the plain TCP path.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_ANY, BPF_F_INGRESS},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    counters::Counter,
    redirect::SETTING_OUTBOUND_PORT,
    service::FAMILY_V4,
    sockmap::{SockTuple, SETTING_LOOPBACK_SOCKMAP},
};

use crate::{
    maps::{count, setting, setting_value, LOOPBACK_SOCKETS},
    sockaddr::{from_parts, Dest},
};

/// On a socket's established callback (active or passive): joins the map when the socket is an
/// end of the loopback hop to the agent's outbound listener.
#[inline(always)]
pub fn on_established(ctx: &SockOpsContext, local: &Dest, remote: &Dest) {
    if !setting(SETTING_LOOPBACK_SOCKMAP) {
        return;
    }
    let port = setting_value(SETTING_OUTBOUND_PORT);
    if port == 0 || port > u32::from(u16::MAX) {
        return;
    }
    #[expect(clippy::cast_possible_truncation, reason = "checked above")]
    let port = (port as u16).to_be();
    if local.port != port && remote.port != port {
        return;
    }
    if !is_loopback(local) || !is_loopback(remote) {
        return;
    }
    let key = SockTuple {
        local_addr: local.addr,
        remote_addr: remote.addr,
        local_port: local.port,
        remote_port: remote.port,
        family: local.family,
        _pad: [0; 3],
    };
    // SAFETY: the kernel hands sock_ops a valid context; the helper only reads its socket.
    if LOOPBACK_SOCKETS
        .update(key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY))
        .is_err()
    {
        count(Counter::MapUpdateFailed);
    }
}

/// The `sk_msg` verdict for a message sent on a socket in the map: redirected to the peer's
/// ingress when the peer is in the map, else passed on to TCP.
#[inline(always)]
pub fn verdict(ctx: &SkMsgContext) -> u32 {
    let Some(tuple) = tuple_of(ctx) else {
        return SK_PASS;
    };
    let mut peer = tuple.reversed();
    // The helper answers SK_PASS once it has set the redirect, SK_DROP when the peer is not in
    // the map; that case must not drop the message but send it the ordinary way.
    let redirected = LOOPBACK_SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS));
    if redirected == i64::from(SK_PASS) {
        count(Counter::LoopbackRedirected);
    }
    SK_PASS
}

/// The sending socket's own tuple. `remote_port` holds the network-order port in its upper 16
/// bits and `local_port` is in host order, as in `sock_ops`.
#[inline(always)]
fn tuple_of(ctx: &SkMsgContext) -> Option<SockTuple> {
    let msg = ctx.msg;
    // SAFETY: the kernel hands sk_msg a valid context and these fields are readable. Each field
    // is read up front with its own load, so that LLVM does not share a modified ctx pointer
    // between them ("dereference of modified ctx ptr").
    let (af, local_ip4, remote_ip4, local_ip6, remote_ip6, local_port, remote_port) = unsafe {
        (
            read_volatile(addr_of!((*msg).family)),
            read_volatile(addr_of!((*msg).local_ip4)),
            read_volatile(addr_of!((*msg).remote_ip4)),
            [
                read_volatile(addr_of!((*msg).local_ip6[0])),
                read_volatile(addr_of!((*msg).local_ip6[1])),
                read_volatile(addr_of!((*msg).local_ip6[2])),
                read_volatile(addr_of!((*msg).local_ip6[3])),
            ],
            [
                read_volatile(addr_of!((*msg).remote_ip6[0])),
                read_volatile(addr_of!((*msg).remote_ip6[1])),
                read_volatile(addr_of!((*msg).remote_ip6[2])),
                read_volatile(addr_of!((*msg).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*msg).local_port)),
            read_volatile(addr_of!((*msg).remote_port)),
        )
    };
    #[expect(clippy::cast_possible_truncation, reason = "the port is 16 bits")]
    let local = from_parts(af, local_ip4, local_ip6, (local_port as u16).to_be())?;
    let remote = from_parts(af, remote_ip4, remote_ip6, (remote_port >> 16) as u16)?;
    Some(SockTuple {
        local_addr: local.addr,
        remote_addr: remote.addr,
        local_port: local.port,
        remote_port: remote.port,
        family: local.family,
        _pad: [0; 3],
    })
}

/// True for `127.0.0.0/8` and `::1`.
#[inline(always)]
fn is_loopback(dest: &Dest) -> bool {
    if dest.family == FAMILY_V4 {
        dest.addr[0].to_ne_bytes()[0] == 127
    } else {
        dest.addr == [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    }
}
