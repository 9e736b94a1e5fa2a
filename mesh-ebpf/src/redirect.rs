//! The kernel's half of the mTLS path (see `mesh_common::redirect`).
//!
//! Owns the record of where a redirected connection was really going: written under the socket
//! cookie at connect time ([`record`]), moved to the client's address and port once the
//! connection is established ([`rekey_established`]), where the agent's outbound listener finds
//! it. Also owns recognising the agent's own sockets by their mark.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{helpers::bpf_get_current_cgroup_id, programs::SockAddrContext};
use mesh_common::{
    counters::Counter,
    redirect::{OriginalDest, SockKey, AGENT_MARK, SETTING_OUTBOUND_PORT},
    service::FAMILY_V6,
};

use crate::{
    maps::{count, setting_value, REDIRECT_BY_COOKIE, REDIRECT_BY_PEER},
    sockaddr::Dest,
};

/// True when the socket was opened by the agent (marked with [`AGENT_MARK`]).
#[inline(always)]
pub fn is_agent_socket(ctx: &SockAddrContext) -> bool {
    // SAFETY: every sock_addr context carries a valid socket pointer; `mark` is readable from
    // it. Volatile keeps the two loads separate, as the verifier wants.
    let mark = unsafe {
        let sk = read_volatile(addr_of!((*ctx.sock_addr).__bindgen_anon_1.sk));
        read_volatile(addr_of!((*sk).mark))
    };
    mark == AGENT_MARK
}

/// Where an mTLS connect goes instead of the backend: the agent's outbound listener on
/// loopback, in the socket's own family. `None` when no agent set the port (fail closed).
#[inline(always)]
pub fn outbound_listener(family: u8) -> Option<Dest> {
    let port = setting_value(SETTING_OUTBOUND_PORT);
    if port == 0 || port > u32::from(u16::MAX) {
        return None;
    }
    #[expect(clippy::cast_possible_truncation, reason = "checked above")]
    let port = (port as u16).to_be();
    let addr = if family == FAMILY_V6 {
        [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
    } else {
        [u32::from_ne_bytes([127, 0, 0, 1]), 0, 0, 0]
    };
    Some(Dest { addr, port, family })
}

/// Remembers, under the client socket's cookie, the backend an mTLS connect was balanced to.
#[inline(always)]
pub fn record(cookie: u64, service_id: u32, backend: &Dest) {
    let value = OriginalDest {
        backend: backend.addr,
        backend_port: backend.port,
        family: backend.family,
        _pad: 0,
        service_id,
        // SAFETY: reads the calling task's cgroup; always valid in process context.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
    };
    if REDIRECT_BY_COOKIE.insert(cookie, value, 0).is_err() {
        count(Counter::MapUpdateFailed);
    }
}

/// On the client's established callback: moves the socket's record, if any, from its cookie to
/// its own address and port (`local`), which the agent sees as the peer it accepted. Returns
/// true when the socket was redirected.
#[inline(always)]
pub fn rekey_established(cookie: u64, local: &Dest) -> bool {
    // SAFETY: copied out at once.
    let Some(original) = (unsafe { REDIRECT_BY_COOKIE.get(cookie) }).copied() else {
        return false;
    };
    let key = SockKey {
        addr: local.addr,
        port: local.port,
        family: local.family,
        _pad: 0,
    };
    if REDIRECT_BY_PEER.insert(key, original, 0).is_err() {
        count(Counter::MapUpdateFailed);
    }
    let _ = REDIRECT_BY_COOKIE.remove(cookie);
    true
}

/// True while an mTLS socket waits to be established (its record is still under its cookie).
#[inline(always)]
pub fn is_redirected(cookie: u64) -> bool {
    // SAFETY: only existence is checked.
    unsafe { REDIRECT_BY_COOKIE.get(cookie) }.is_some()
}
