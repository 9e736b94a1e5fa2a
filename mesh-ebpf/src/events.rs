//! Flow-event output: rate-bounded, never blocking, never failing the socket call.
//!
//! Each CPU has a token bucket refilled at `EVENTS_PER_SECOND_PER_CPU`; an event over budget or
//! one that finds the ring buffer full is dropped and counted as `events_dropped`.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
};
use mesh_common::{
    counters::Counter,
    events::{
        FlowEvent, AFFINITY_NONE, EVENTS_PER_SECOND_PER_CPU, RING_BYTES, SETTING_FLOW_EVENTS,
    },
};

use crate::{
    maps::{count, setting, EVENTS, EVENT_BUDGET},
    sockaddr::Dest,
};

/// The event of a decision about a VIP, still without its outcome: rewritten, no backend.
#[inline(always)]
pub fn for_vip(cookie: u64, vip: &Dest, proto: u8, hook: u8) -> FlowEvent {
    FlowEvent {
        timestamp_ns: 0,
        cookie,
        cgroup_id: 0,
        vip: vip.addr,
        backend: [0; 4],
        vip_port: vip.port,
        backend_port: 0,
        family: vip.family,
        proto,
        verdict: Counter::Rewritten as u8,
        hook,
        service_id: 0,
        backend_id: 0,
        affinity: AFFINITY_NONE,
        _pad: [0; 7],
    }
}

/// Stamps `event` with the time and the caller's cgroup and sends it to the agent, if flow
/// events are on and the budget allows.
#[inline(always)]
pub fn emit(event: &mut FlowEvent) {
    if !setting(SETTING_FLOW_EVENTS) {
        return;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_token(now) {
        count(Counter::EventDropped);
        return;
    }
    event.timestamp_ns = now;
    // SAFETY: reads the calling task's cgroup; always valid in process context.
    event.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    // Waking the agent for every event would cost a context switch per connection; it polls
    // the ring every `WAKEUP_POLL_MS` anyway, and is woken early only when the ring fills up.
    let wakeup = if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) > u64::from(RING_BYTES / 4) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS
        .output::<FlowEvent>(&*event, u64::from(wakeup))
        .is_err()
    {
        count(Counter::EventDropped);
    }
}

/// Takes one token from this CPU's bucket, refilling it for the time that passed.
#[inline(always)]
fn take_token(now: u64) -> bool {
    let Some(bucket) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU value of this CPU, touched only by this program run.
    let bucket = unsafe { &mut *bucket };
    let elapsed = now.saturating_sub(bucket.refilled_ns);
    // One token per 1/EVENTS_PER_SECOND_PER_CPU seconds, up to one second's worth.
    let refill = elapsed / (1_000_000_000 / EVENTS_PER_SECOND_PER_CPU);
    if refill > 0 {
        bucket.tokens = (bucket.tokens + refill).min(EVENTS_PER_SECOND_PER_CPU);
        bucket.refilled_ns = now;
    }
    if bucket.tokens == 0 {
        return false;
    }
    bucket.tokens -= 1;
    true
}
