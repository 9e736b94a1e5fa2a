//! `cgroup_skb/ingress`: strict mTLS services accept connections from the agent only.
//!
//! A TCP connection opening (SYN without ACK) addressed to a backend of a strict service
//! ([`STRICT_INBOUND`]) is dropped unless it carries the agent's mark ([`AGENT_MARK`]): only the
//! local agent, after authenticating and authorising the caller, may open one. The agent's
//! sockets are marked, and the mark travels with their packets over loopback; a packet from
//! another host or namespace never carries it. Packets of established connections, and
//! everything that is not TCP, pass untouched after a few loads.

use aya_ebpf::programs::SkBuffContext;
use mesh_common::{
    counters::Counter,
    redirect::{SockKey, AGENT_MARK},
    service::{FAMILY_V4, FAMILY_V6, PROTO_TCP},
};

use crate::maps::{count, STRICT_INBOUND};

/// `skb->protocol` of IPv4 and IPv6 (the EtherType, big-endian, as the context holds it).
const ETH_P_IP: u32 = 0x0800;
const ETH_P_IPV6: u32 = 0x86dd;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const IPV6_HEADER_LEN: usize = 40;

/// True when the packet may go on to its socket.
#[inline(always)]
pub fn admit(ctx: &SkBuffContext) -> bool {
    let Some((key, tcp_offset)) = tcp_destination(ctx) else {
        return true;
    };
    let Ok(flags) = ctx.load::<u8>(tcp_offset + 13) else {
        return true;
    };
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) != TCP_FLAG_SYN {
        return true;
    }
    // SAFETY: only existence is checked.
    if unsafe { STRICT_INBOUND.get(key) }.is_none() {
        return true;
    }
    // SAFETY: the kernel hands every cgroup_skb program a valid context; `mark` is readable.
    if unsafe { (*ctx.skb.skb).mark } == AGENT_MARK {
        return true;
    }
    count(Counter::StrictDropped);
    false
}

/// The destination address and port of a TCP packet, and where its TCP header starts.
#[inline(always)]
fn tcp_destination(ctx: &SkBuffContext) -> Option<(SockKey, usize)> {
    // SAFETY: as in `admit`; `protocol` is readable.
    let protocol = u32::from_be(unsafe { (*ctx.skb.skb).protocol }) >> 16;
    let mut key = SockKey {
        addr: [0; 4],
        port: 0,
        family: FAMILY_V4,
        _pad: 0,
    };
    let tcp_offset = match protocol {
        ETH_P_IP => {
            let version_ihl = ctx.load::<u8>(0).ok()?;
            if ctx.load::<u8>(9).ok()? != PROTO_TCP {
                return None;
            }
            key.addr[0] = ctx.load::<u32>(16).ok()?;
            usize::from(version_ihl & 0x0f) * 4
        }
        ETH_P_IPV6 => {
            // Extension headers are not followed: a TCP opening behind one is not checked.
            if ctx.load::<u8>(6).ok()? != PROTO_TCP {
                return None;
            }
            key.family = FAMILY_V6;
            key.addr = ctx.load::<[u32; 4]>(24).ok()?;
            IPV6_HEADER_LEN
        }
        _ => return None,
    };
    key.port = ctx.load::<u16>(tcp_offset + 2).ok()?;
    Some((key, tcp_offset))
}
