//! `sock_ops`: what the kernel learns from a balanced TCP socket after `connect`.
//!
//! * An mTLS socket's original-destination record moves from its cookie to its own address and
//!   port once established (see [`crate::redirect`]).
//! * For passive health checking, a socket sent straight to a backend (it has a reverse record)
//!   asks for state and retransmission-timeout callbacks, and its outcome is counted per
//!   backend address: established, failed (left SYN-SENT for CLOSE: reset, SYN retries
//!   exhausted, abandoned) and SYN timeouts. Once established the callbacks are turned off
//!   again, so a healthy connection costs nothing more.
//! * Both ends of the loopback hop to the agent's outbound listener join the sockmap once
//!   established (see [`crate::sockmap`]).

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{helpers::bpf_get_socket_cookie, programs::SockOpsContext, EbpfContext as _};
use mesh_common::{counters::Counter, health::ConnectOutcomes, redirect::SockKey};

use crate::{
    maps::{count, BPF_NOEXIST, CONNECT_OUTCOMES, REVERSE},
    redirect,
    sockaddr::{from_parts, Dest},
    sockmap,
};

const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: u32 = 5;
const BPF_SOCK_OPS_RTO_CB: u32 = 8;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_RTO_CB_FLAG: i32 = 1 << 0;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 1 << 2;
const TCP_SYN_SENT: u32 = 2;
const TCP_CLOSE: u32 = 7;

/// Handles one `sock_ops` callback.
#[inline(always)]
pub fn handle(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => on_established(ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if let (Some(local), Some(remote)) = (local(ctx), remote(ctx)) {
                sockmap::on_established(ctx, &local, &remote);
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(0) == TCP_SYN_SENT && ctx.arg(1) == TCP_CLOSE {
                if let Some(backend) = remote(ctx) {
                    count(Counter::ConnectFailed);
                    record(&backend, |o| o.failed += 1);
                }
            }
        }
        BPF_SOCK_OPS_RTO_CB => {
            // SAFETY: `state` is readable in every sock_ops callback.
            let state = unsafe { read_volatile(addr_of!((*ctx.ops).state)) };
            if state == TCP_SYN_SENT {
                if let Some(backend) = remote(ctx) {
                    record(&backend, |o| o.syn_timeouts += 1);
                }
            }
        }
        _ => {}
    }
}

/// A socket balanced straight to a backend asks to hear how its connect ends.
#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let Some(backend) = remote(ctx) else {
        return;
    };
    // SAFETY: the socket cookie helper accepts a sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if redirect::is_redirected(cookie) {
        // Bound for the agent's listener; the tunnel reports on the backend.
        return;
    }
    let key = mesh_common::service::ReverseKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        family: backend.family,
        _pad: [0; 5],
    };
    // SAFETY: only existence is checked.
    if unsafe { REVERSE.get(key) }.is_some() {
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTO_CB_FLAG);
    }
}

#[inline(always)]
fn on_established(ctx: &SockOpsContext) {
    if ctx.cb_flags() & (BPF_SOCK_OPS_STATE_CB_FLAG as u32) != 0 {
        let _ = ctx.set_cb_flags(0);
        if let Some(backend) = remote(ctx) {
            record(&backend, |o| o.established += 1);
        }
        return;
    }
    if let Some(local) = local(ctx) {
        // SAFETY: the socket cookie helper accepts a sock_ops context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if redirect::rekey_established(cookie, &local) {
            if let Some(remote) = remote(ctx) {
                sockmap::on_established(ctx, &local, &remote);
            }
        }
    }
}

/// Adds to the backend's outcome counts on this CPU, creating the entry on first use.
#[inline(always)]
fn record(backend: &Dest, update: impl Fn(&mut ConnectOutcomes)) {
    let key = SockKey {
        addr: backend.addr,
        port: backend.port,
        family: backend.family,
        _pad: 0,
    };
    match CONNECT_OUTCOMES.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a successful lookup; no other CPU writes it.
        Some(outcomes) => update(unsafe { &mut *outcomes }),
        None => {
            let mut outcomes = ConnectOutcomes::default();
            update(&mut outcomes);
            // If another CPU created it meanwhile, losing this one count is acceptable.
            if CONNECT_OUTCOMES.insert(key, outcomes, BPF_NOEXIST).is_err() {
                count(Counter::MapUpdateFailed);
            }
        }
    }
}

/// The socket's peer. `remote_port` holds the network-order port in its upper 16 bits.
#[inline(always)]
fn remote(ctx: &SockOpsContext) -> Option<Dest> {
    let ops = ctx.ops;
    // SAFETY: sock_ops contexts are always valid and these fields readable in every callback.
    // Every field is read up front with its own load: reading inside the family branch lets
    // LLVM share one field pointer, which the verifier rejects ("dereference of modified ctx
    // ptr").
    let (af, ip4, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).remote_ip4)),
            [
                read_volatile(addr_of!((*ops).remote_ip6[0])),
                read_volatile(addr_of!((*ops).remote_ip6[1])),
                read_volatile(addr_of!((*ops).remote_ip6[2])),
                read_volatile(addr_of!((*ops).remote_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).remote_port)),
        )
    };
    from_parts(af, ip4, ip6, (port >> 16) as u16)
}

/// The socket's own address; `local_port` is in host order.
#[inline(always)]
fn local(ctx: &SockOpsContext) -> Option<Dest> {
    let ops = ctx.ops;
    // SAFETY: as in `remote`.
    let (af, ip4, ip6, port) = unsafe {
        (
            read_volatile(addr_of!((*ops).family)),
            read_volatile(addr_of!((*ops).local_ip4)),
            [
                read_volatile(addr_of!((*ops).local_ip6[0])),
                read_volatile(addr_of!((*ops).local_ip6[1])),
                read_volatile(addr_of!((*ops).local_ip6[2])),
                read_volatile(addr_of!((*ops).local_ip6[3])),
            ],
            read_volatile(addr_of!((*ops).local_port)),
        )
    };
    #[expect(clippy::cast_possible_truncation, reason = "the port is 16 bits")]
    from_parts(af, ip4, ip6, (port as u16).to_be())
}
