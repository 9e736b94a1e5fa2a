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
    programs::SockAddrContext,
    EbpfContext as _,
};
use mesh_common::{
    counters::Counter,
    hash::client_hash,
    service::{
        AffinityKey, AffinityValue, Backend, ReverseKey, ReverseValue, Service, ServiceKey,
        SlotKey, LB_MAGLEV, SERVICE_FLAG_AFFINITY_NETNS,
    },
};

use crate::{
    maps::{count, AFFINITY, BACKENDS, REVERSE, SERVICES, SLOTS},
    sockaddr::Dest,
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

/// Decides where a socket addressed to `dest` over `proto` goes.
#[inline(always)]
pub fn decide(ctx: &SockAddrContext, dest: &Dest, proto: u8) -> Verdict {
    let key = ServiceKey {
        addr: dest.addr,
        port: dest.port,
        proto,
        family: dest.family,
    };
    // SAFETY: the value is copied out at once; the agent replaces entries, never mutates them.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        let marker = ServiceKey::vip_marker(dest.addr, dest.family);
        // SAFETY: as above, only existence is checked.
        if unsafe { SERVICES.get(marker) }.is_some() {
            count(Counter::NoServicePort);
            return Verdict::Refuse;
        }
        count(Counter::Passthrough);
        return Verdict::Pass;
    };
    if service.count == 0 {
        count(Counter::NoBackend);
        return Verdict::Refuse;
    }
    let backend = match pick(ctx, &key, &service) {
        Some(backend) => backend,
        None => {
            count(Counter::SlotMissing);
            return Verdict::Refuse;
        }
    };
    let to = Dest {
        addr: backend.addr,
        port: backend.port,
        family: backend.family,
    };
    remember_vip(ctx, dest, &to);
    count(Counter::Rewritten);
    Verdict::Rewrite(to)
}

/// Chooses a backend: the remembered one for a client with affinity, else a slot.
#[inline(always)]
fn pick(ctx: &SockAddrContext, key: &ServiceKey, service: &Service) -> Option<Backend> {
    if !service.has_affinity() {
        // SAFETY: the socket cookie helper accepts every sock_addr context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        return pick_slot(key, service, cookie);
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
    // SAFETY: no sleeping helper runs between the lookup and these reads and writes.
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
                    return Some(backend);
                }
            }
        }
    }
    count(Counter::AffinityMiss);
    let (backend_id, backend) = pick_slot_with_id(key, service, client)?;
    let value = AffinityValue {
        last_used_ns: now,
        backend_id,
        _pad: 0,
    };
    if AFFINITY.insert(affinity_key, value, 0).is_err() {
        count(Counter::MapUpdateFailed);
    }
    Some(backend)
}

#[inline(always)]
fn pick_slot(key: &ServiceKey, service: &Service, hash_input: u64) -> Option<Backend> {
    pick_slot_with_id(key, service, hash_input).map(|(_, backend)| backend)
}

/// Picks slot `hash(hash_input) % count` for Maglev, a random slot otherwise.
///
/// If the slot is gone because the agent flipped generations between our header read and our
/// slot read, the header is read once more: the new generation is complete by then.
#[inline(always)]
fn pick_slot_with_id(
    key: &ServiceKey,
    service: &Service,
    hash_input: u64,
) -> Option<(u32, Backend)> {
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
fn remember_vip(ctx: &SockAddrContext, vip: &Dest, backend: &Dest) {
    // SAFETY: the socket cookie helper accepts every sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
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
