//! The maps the programs share with the agent, pinned by name under the agent's pin directory.
//!
//! Names, sizes and layouts come from `mesh_common`; this module only declares them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
};
use mesh_common::{
    counters::Counter,
    events::{EventBudget, RING_BYTES, SETTINGS_MAX},
    health::ConnectOutcomes,
    maps as limits,
    redirect::{OriginalDest, SockKey},
    service::{
        AffinityKey, AffinityValue, Backend, ReverseKey, ReverseValue, Service, ServiceKey, SlotKey,
    },
    sockmap::SockTuple,
};

/// `BPF_F_NO_PREALLOC`: allocate entries on insert. The slot and backend maps are large and
/// written only by the agent, so they need not reserve their full capacity up front.
const NO_PREALLOC: u32 = 1;

/// `BPF_NOEXIST`: create the entry only if it is absent.
pub const BPF_NOEXIST: u64 = 1;

#[map(name = "MESH_SVC_V1")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::pinned(limits::SERVICES_MAX, 0);

#[map(name = "MESH_SLOT_V1")]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(limits::SLOTS_MAX, NO_PREALLOC);

#[map(name = "MESH_BE_V1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(limits::BACKENDS_MAX, NO_PREALLOC);

#[map(name = "MESH_REV_V1")]
pub static REVERSE: LruHashMap<ReverseKey, ReverseValue> =
    LruHashMap::pinned(limits::REVERSE_MAX, 0);

#[map(name = "MESH_AFF_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(limits::AFFINITY_MAX, 0);

#[map(name = "MESH_CNT_V1")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(limits::COUNTERS_MAX, 0);

/// Per-CPU, so counting needs no atomics; created on a backend's first use.
#[map(name = "MESH_BECNT_V1")]
pub static BACKEND_COUNTS: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::pinned(limits::BACKENDS_MAX, NO_PREALLOC);

#[map(name = "MESH_RDC_V1")]
pub static REDIRECT_BY_COOKIE: LruHashMap<u64, OriginalDest> =
    LruHashMap::pinned(limits::REDIRECT_MAX, 0);

#[map(name = "MESH_RDP_V1")]
pub static REDIRECT_BY_PEER: LruHashMap<SockKey, OriginalDest> =
    LruHashMap::pinned(limits::REDIRECT_MAX, 0);

#[map(name = "MESH_STRICT_V1")]
pub static STRICT_INBOUND: HashMap<SockKey, u32> = HashMap::pinned(limits::STRICT_MAX, 0);

/// Per-CPU, so counting needs no atomics; created on a backend's first balanced connect.
#[map(name = "MESH_OUTCOME_V1")]
pub static CONNECT_OUTCOMES: PerCpuHashMap<SockKey, ConnectOutcomes> =
    PerCpuHashMap::pinned(limits::BACKENDS_MAX, NO_PREALLOC);

/// Pinned with the others: the `sk_msg` program is attached to this map, so the attachment
/// lives as long as the pin and a restarted agent finds it in place.
#[map(name = "MESH_LOSOCK_V1")]
pub static LOOPBACK_SOCKETS: SockHash<SockTuple> =
    SockHash::pinned(limits::LOOPBACK_SOCKETS_MAX, 0);

#[map(name = "MESH_SET_V1")]
pub static SETTINGS: Array<u32> = Array::with_max_entries(SETTINGS_MAX, 0);

#[map(name = "MESH_EVB_V1")]
pub static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "MESH_EVT_V1")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

/// True when the agent turned setting `index` on.
#[inline(always)]
pub fn setting(index: u32) -> bool {
    setting_value(index) != 0
}

/// Adds one to `counter` on this CPU.
#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and is only touched
        // by this CPU while the program runs with preemption disabled.
        unsafe { *slot += 1 };
    }
}

/// The setting at `index` (0 when unset).
#[inline(always)]
pub fn setting_value(index: u32) -> u32 {
    SETTINGS.get(index).copied().unwrap_or(0)
}
