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
    events::{FlowEvent, EVENTS_PER_SECOND_PER_CPU, RING_BYTES, SETTING_FLOW_EVENTS},
};

use crate::maps::{count, setting, EVENTS, EVENT_BUDGET};

/// What a decision looked like, in the map encoding.
pub struct Decision {
    pub cookie: u64,
    pub vip: [u32; 4],
    pub vip_port: u16,
    pub backend: [u32; 4],
    pub backend_port: u16,
    pub family: u8,
    pub proto: u8,
    pub verdict: Counter,
    pub hook: u8,
    pub service_id: u32,
    pub backend_id: u32,
    pub affinity: u8,
}

/// Sends `decision` to the agent if flow events are on and the budget allows.
#[inline(always)]
pub fn emit(decision: &Decision) {
    if !setting(SETTING_FLOW_EVENTS) {
        return;
    }
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_token(now) {
        count(Counter::EventDropped);
        return;
    }
    let event = FlowEvent {
        timestamp_ns: now,
        cookie: decision.cookie,
        // SAFETY: reads the calling task's cgroup; always valid in process context.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        vip: decision.vip,
        backend: decision.backend,
        vip_port: decision.vip_port,
        backend_port: decision.backend_port,
        family: decision.family,
        proto: decision.proto,
        verdict: decision.verdict as u8,
        hook: decision.hook,
        service_id: decision.service_id,
        backend_id: decision.backend_id,
        affinity: decision.affinity,
        _pad: [0; 7],
    };
    // Waking the agent for every event would cost a context switch per connection; it polls
    // the ring every `WAKEUP_POLL_MS` anyway, and is woken early only when the ring fills up.
    let wakeup = if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) > u64::from(RING_BYTES / 4) {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS
        .output::<FlowEvent>(&event, u64::from(wakeup))
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
