//! Service lookup and backend selection, shared by connect and sendmsg for both families.
//!
//! Owns the decision "which backend does this socket go to", the affinity memory and the reverse
//! record that lets `getpeername`/`recvmsg` show the VIP again. It never touches a socket that is
//! not addressed to a VIP.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    programs::{SockAddrContext, SockContext},
    EbpfContext as _,
};
use aya_log_ebpf::debug;

use mesh_common::{
    counters::Counter,
    events::{FlowEvent, AFFINITY_HIT, AFFINITY_MISS, AFFINITY_NONE, SETTING_DEBUG_LOG},
    hash::client_hash,
    service::{
        AffinityKey, AffinityValue, Backend, ReverseKey, ReverseValue, Service, ServiceKey,
        SlotKey, LB_MAGLEV, PROTO_TCP, SERVICE_FLAG_AFFINITY_NETNS, SERVICE_FLAG_MTLS,
    },
};

use crate::{
    events,
    maps::{
        count, setting, AFFINITY, BACKENDS, BACKEND_COUNTS, BPF_NOEXIST, REVERSE, SERVICES, SLOTS,
    },
    redirect,
    sockaddr::{self, Dest},
};

/// What the program decided for a socket.
pub enum Verdict {
    /// Not a VIP: leave the socket alone.
    Pass,
    /// Send the socket here.
    Rewrite(Dest),
    /// A VIP with no usable backend: fail the call with `ECONNREFUSED`.
    Refuse,
}

/// Decides where a socket addressed to `dest` over `proto` goes, from `hook`
/// (`events::HOOK_*`), and reports the decision as a flow event.
///
/// Most connects on a host are not to a VIP: they pay one map lookup (two for a miss) and a
/// counter, nothing else; the socket cookie and the event are only made for VIP traffic.
#[inline(always)]
pub fn decide(ctx: &SockAddrContext, dest: &Dest, proto: u8, hook: u8) -> Verdict {
    let key = ServiceKey {
        addr: dest.addr,
        port: dest.port,
        proto,
        family: dest.family,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries, never mutates them.
    let service = unsafe { SERVICES.get(key) }.copied();
    if service.is_none() {
        let marker = ServiceKey::vip_marker(dest.addr, dest.family);
        // SAFETY: as above, only existence is checked.
        if unsafe { SERVICES.get(marker) }.is_none() {
            count(Counter::Passthrough);
            return Verdict::Pass;
        }
    }
    // SAFETY: the socket cookie helper accepts every sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let mut event = events::for_vip(cookie, dest, proto, hook);
    let Some(service) = service else {
        return refuse(ctx, &mut event, Counter::NoServicePort);
    };
    event.service_id = service.id;
    if service.count == 0 {
        return refuse(ctx, &mut event, Counter::NoBackend);
    }
    let Some((backend_id, backend, affinity)) = pick(ctx, &key, &service, cookie) else {
        return refuse(ctx, &mut event, Counter::SlotMissing);
    };
    let backend_dest = Dest {
        addr: backend.addr,
        port: backend.port,
        family: backend.family,
    };
    let to = if service.flags & SERVICE_FLAG_MTLS != 0 && proto == PROTO_TCP {
        // Through the agents' tunnel: the agent finds the backend by this record.
        let Some(listener) = redirect::outbound_listener(dest.family) else {
            return refuse(ctx, &mut event, Counter::MtlsNoAgent);
        };
        redirect::record(cookie, service.id, &backend_dest);
        count(Counter::MtlsRedirected);
        event.verdict = Counter::MtlsRedirected as u8;
        listener
    } else {
        count(Counter::Rewritten);
        backend_dest
    };
    remember_vip(cookie, dest, &to);
    if setting(SETTING_DEBUG_LOG) {
        debug!(
            ctx,
            "service {} -> backend {} (socket {}, affinity {})",
            service.id,
            backend_id,
            cookie,
            affinity
        );
    }
    count_backend(backend_id);
    event.backend = backend.addr;
    event.backend_port = backend.port;
    event.backend_id = backend_id;
    event.affinity = affinity;
    events::emit(&mut event);
    Verdict::Rewrite(to)
}

#[inline(always)]
fn refuse(ctx: &SockAddrContext, event: &mut FlowEvent, reason: Counter) -> Verdict {
    count(reason);
    if setting(SETTING_DEBUG_LOG) {
        debug!(
            ctx,
            "service {} refused: reason {} (socket {})",
            event.service_id,
            reason as u32,
            event.cookie
        );
    }
    event.verdict = reason as u8;
    events::emit(event);
    Verdict::Refuse
}

/// Adds one to the backend's connection count, creating the entry on first use.
#[inline(always)]
fn count_backend(backend_id: u32) {
    match BACKEND_COUNTS.get_ptr_mut(backend_id) {
        // SAFETY: this CPU's value of a successful lookup; no other CPU writes it.
        Some(total) => unsafe { *total += 1 },
        None => {
            // Creates the entry with 1 on this CPU and 0 elsewhere. If another CPU created it
            // meanwhile (BPF_NOEXIST fails), losing this one count is acceptable.
            if BACKEND_COUNTS.insert(backend_id, 1, BPF_NOEXIST).is_err() {
                count(Counter::MapUpdateFailed);
            }
        }
    }
}

/// Chooses a backend: the remembered one for a client with affinity, else a slot. Returns the
/// backend id, the backend and the `events::AFFINITY_*` outcome.
#[inline(always)]
fn pick(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    service: &Service,
    cookie: u64,
) -> Option<(u32, Backend, u8)> {
    if !service.has_affinity() {
        let (id, backend) = pick_slot(key, service, cookie)?;
        return Some((id, backend, AFFINITY_NONE));
    }
    let client = if service.flags & SERVICE_FLAG_AFFINITY_NETNS != 0 {
        // SAFETY: the netns cookie helper accepts every sock_addr context.
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
    } else {
        // SAFETY: reads the calling task's cgroup; always valid in process context.
        unsafe { bpf_get_current_cgroup_id() }
    };
    let affinity_key = AffinityKey {
        client,
        service_id: service.id,
        _pad: 0,
    };
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(remembered) = AFFINITY.get_ptr_mut(affinity_key) {
        // SAFETY: the pointer comes from a successful lookup; a racing CPU can at worst write
        // the same kind of value.
        let entry = unsafe { &mut *remembered };
        let timeout_ns = u64::from(service.affinity_timeout_s) * 1_000_000_000;
        if now.wrapping_sub(entry.last_used_ns) < timeout_ns {
            // SAFETY: copied out at once.
            if let Some(backend) = unsafe { BACKENDS.get(entry.backend_id) }.copied() {
                if backend.service_id == service.id {
                    entry.last_used_ns = now;
                    count(Counter::AffinityHit);
                    return Some((entry.backend_id, backend, AFFINITY_HIT));
                }
            }
        }
    }
    count(Counter::AffinityMiss);
    let (backend_id, backend) = pick_slot(key, service, client)?;
    let value = AffinityValue {
        last_used_ns: now,
        backend_id,
        _pad: 0,
    };
    if AFFINITY.insert(affinity_key, value, 0).is_err() {
        count(Counter::MapUpdateFailed);
    }
    Some((backend_id, backend, AFFINITY_MISS))
}

/// Picks slot `hash(hash_input) % count` for Maglev, a random slot otherwise.
///
/// If the slot is gone because the agent flipped generations between our header read and our
/// slot read, the header is read once more: the new generation is complete by then.
#[inline(always)]
fn pick_slot(key: &ServiceKey, service: &Service, hash_input: u64) -> Option<(u32, Backend)> {
    let draw = if service.lb == LB_MAGLEV {
        client_hash(hash_input, service.id)
    } else {
        // SAFETY: no preconditions.
        unsafe { bpf_get_prandom_u32() }
    };
    if let Some(found) = slot_backend(service, draw) {
        return Some(found);
    }
    // SAFETY: copied out at once.
    let fresh = unsafe { SERVICES.get(key) }.copied()?;
    if fresh.count == 0 {
        return None;
    }
    slot_backend(&fresh, draw)
}

#[inline(always)]
fn slot_backend(service: &Service, draw: u32) -> Option<(u32, Backend)> {
    let slot = SlotKey {
        service_id: service.id,
        generation: service.generation,
        slot: draw % service.count,
    };
    // SAFETY: copied out at once.
    let backend_id = unsafe { SLOTS.get(slot) }.copied()?;
    // SAFETY: copied out at once.
    let backend = unsafe { BACKENDS.get(backend_id) }.copied()?;
    Some((backend_id, backend))
}

/// Records, under the socket's cookie and the backend, which VIP the socket asked for.
#[inline(always)]
fn remember_vip(cookie: u64, vip: &Dest, backend: &Dest) {
    let key = reverse_key(cookie, backend);
    let value = ReverseValue {
        addr: vip.addr,
        port: vip.port,
        family: vip.family,
        _pad: 0,
    };
    if REVERSE.insert(key, value, 0).is_err() {
        count(Counter::MapUpdateFailed);
    }
}

/// The VIP to show instead of `peer` for this socket, if it was balanced there.
#[inline(always)]
pub fn vip_for_peer(ctx: &SockAddrContext, peer: &Dest) -> Option<Dest> {
    // SAFETY: the socket cookie helper accepts every sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let vip = unsafe { REVERSE.get(reverse_key(cookie, peer)) }.copied()?;
    count(Counter::ReverseHit);
    Some(Dest {
        addr: vip.addr,
        port: vip.port,
        family: vip.family,
    })
}

/// Deletes the reverse record of a closing connected socket (TCP, connected UDP). Unconnected
/// UDP sockets have no destination here; their records age out of the LRU.
#[inline(always)]
pub fn forget_socket(ctx: &SockContext) {
    let Some(peer) = sockaddr::peer_of(ctx) else {
        return;
    };
    // SAFETY: the socket cookie helper accepts a cgroup/sock context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A socket that was never balanced has no record; that is the common case, not an error.
    let _ = REVERSE.remove(reverse_key(cookie, &peer));
}

#[inline(always)]
fn reverse_key(cookie: u64, backend: &Dest) -> ReverseKey {
    ReverseKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        family: backend.family,
        _pad: [0; 5],
    }
}
