//! The mesh data plane's kernel programs: socket-level load balancing for service VIPs.
//!
//! * `connect4`/`connect6`: TCP and connected UDP to a VIP are connected straight to a backend.
//! * `sendmsg4`/`sendmsg6`: each unconnected UDP datagram to a VIP goes to a backend.
//! * `recvmsg4`/`recvmsg6`: replies from that backend appear to come from the VIP.
//! * `getpeername4`/`getpeername6`: the application sees the VIP as its peer.
//! * `sock_release`: a closing socket's reverse record is deleted.
//! * `sock_ops`: mTLS sockets' records move to their address once established; balanced
//!   sockets' connect outcomes are counted per backend (passive health).
//! * `cgroup_skb/ingress`: plaintext connection openings to strict mTLS backends are dropped.
//! * `sk_msg` (attached to the loopback sockhash, not a cgroup): messages between an
//!   application and the agent's outbound listener skip loopback TCP (see [`sockmap`]).
//!
//! Sockets of the agent itself (marked `AGENT_MARK`) are never balanced or redirected.
//!
//! Entry points are thin: [`balance::decide`] returns a verdict and this file turns it into the
//! program's return code. Every decision bumps a per-reason counter.
#![no_std]
#![no_main]

mod balance;
mod events;
mod maps;
mod redirect;
mod sockaddr;
mod sockmap;
mod strict;
mod tcp_events;

use aya_ebpf::{
    helpers::bpf_set_retval,
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, sk_msg, sock_ops},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockContext, SockOpsContext},
};
use balance::Verdict;
use mesh_common::{
    counters::Counter,
    events::{HOOK_CONNECT, HOOK_SENDMSG},
    service::{PROTO_TCP, PROTO_UDP},
};

/// Return code that lets the call proceed.
const ALLOW: i32 = 1;
/// Return code that fails the call; the error is the one set with `bpf_set_retval`.
const REJECT: i32 = 0;
/// `ECONNREFUSED`, what a client expects from a service with nobody listening.
const ECONNREFUSED: i32 = 111;

/// Writes an address of the hook's own family into the context.
type Writer = fn(&SockAddrContext, &sockaddr::Dest);

#[inline(always)]
fn on_send(ctx: &SockAddrContext, dest: sockaddr::Dest, write: Writer, hook: u8) -> i32 {
    let proto = sockaddr::protocol(ctx);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    if redirect::is_agent_socket(ctx) {
        maps::count(Counter::AgentSocket);
        return ALLOW;
    }
    match balance::decide(ctx, &dest, proto, hook) {
        Verdict::Pass => ALLOW,
        Verdict::Rewrite(to) if to.family == dest.family => {
            write(ctx, &to);
            ALLOW
        }
        // A backend of the other family cannot be reached from this socket (the agent's
        // config validation prevents it); refuse rather than leak the VIP.
        Verdict::Rewrite(_) | Verdict::Refuse => {
            // SAFETY: bpf_set_retval is allowed in connect and sendmsg hooks.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            REJECT
        }
    }
}

#[inline(always)]
fn on_receive(ctx: &SockAddrContext, peer: sockaddr::Dest, write: Writer) -> i32 {
    if let Some(vip) = balance::vip_for_peer(ctx, &peer) {
        if vip.family == peer.family {
            write(ctx, &vip);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    on_send(
        &ctx,
        sockaddr::read_v4(&ctx),
        sockaddr::write_v4,
        HOOK_CONNECT,
    )
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    on_send(
        &ctx,
        sockaddr::read_v6(&ctx),
        sockaddr::write_v6,
        HOOK_CONNECT,
    )
}

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    on_send(
        &ctx,
        sockaddr::read_v4(&ctx),
        sockaddr::write_v4,
        HOOK_SENDMSG,
    )
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    on_send(
        &ctx,
        sockaddr::read_v6(&ctx),
        sockaddr::write_v6,
        HOOK_SENDMSG,
    )
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    on_receive(&ctx, sockaddr::read_v4(&ctx), sockaddr::write_v4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    on_receive(&ctx, sockaddr::read_v6(&ctx), sockaddr::write_v6)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    on_receive(&ctx, sockaddr::read_v4(&ctx), sockaddr::write_v4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    on_receive(&ctx, sockaddr::read_v6(&ctx), sockaddr::write_v6)
}

/// A closing socket takes its reverse record with it, so records never pile up until the LRU
/// has to evict (which costs every connect, and could evict a live connection's record).
#[cgroup_sock(sock_release)]
pub fn mesh_sock_release(ctx: SockContext) -> i32 {
    balance::forget_socket(&ctx);
    ALLOW
}

/// Connect outcomes and mTLS record re-keying (see [`tcp_events`]). Named apart from its
/// section: a function called `sockops` fails to link.
#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    tcp_events::handle(&ctx);
    1
}

/// The loopback sockmap's message verdict (see [`sockmap`]). Named apart from its section: a
/// function called `sk_msg` fails to link.
#[sk_msg]
pub fn mesh_loopback_msg(ctx: SkMsgContext) -> u32 {
    sockmap::verdict(&ctx)
}

/// Return code of a cgroup_skb program that lets the packet through.
const SKB_PASS: i32 = 1;
/// Return code of a cgroup_skb program that drops the packet.
const SKB_DROP: i32 = 0;

#[cgroup_skb(ingress)]
pub fn mesh_strict_ingress(ctx: SkBuffContext) -> i32 {
    if strict::admit(&ctx) {
        SKB_PASS
    } else {
        SKB_DROP
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
