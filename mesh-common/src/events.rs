//! Flow events: one record per balancing decision, sent from the kernel through a ring buffer.
//!
//! The kernel writes a [`FlowEvent`] for every connect or sendmsg addressed to a VIP (rewritten
//! or refused), never for other traffic. Output is rate-bounded per CPU by a token bucket, and a
//! full ring buffer drops the event (counted as `events_dropped`): the data path never waits.

/// Events each CPU may emit per second before it starts dropping.
pub const EVENTS_PER_SECOND_PER_CPU: u64 = 5_000;
/// Size of the ring buffer, in bytes (a power of two, a multiple of the page size).
pub const RING_BYTES: u32 = 1 << 20;
/// How often the agent drains the ring buffer. The kernel does not wake it per event (that
/// would cost a context switch per connection), only when the ring is a quarter full.
pub const WAKEUP_POLL_MS: u64 = 100;

/// The socket call that was balanced.
pub const HOOK_CONNECT: u8 = 0;
/// An unconnected UDP datagram (`sendmsg`).
pub const HOOK_SENDMSG: u8 = 1;

/// No affinity for this service.
pub const AFFINITY_NONE: u8 = 0;
/// The client went back to its remembered backend.
pub const AFFINITY_HIT: u8 = 1;
/// The client had no usable remembered backend and got a new one.
pub const AFFINITY_MISS: u8 = 2;

/// One balancing decision.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` (monotonic clock) at the decision.
    pub timestamp_ns: u64,
    /// Socket cookie of the client socket.
    pub cookie: u64,
    /// Cgroup id of the calling process: the workload's identity on this host.
    pub cgroup_id: u64,
    /// VIP the client asked for, network byte order.
    pub vip: [u32; 4],
    /// Backend chosen (all zero when refused), network byte order.
    pub backend: [u32; 4],
    /// VIP port, network byte order.
    pub vip_port: u16,
    /// Backend port, network byte order.
    pub backend_port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// The decision: a [`crate::counters::Counter`] index (`Rewritten`, `NoBackend`,
    /// `NoServicePort`, `SlotMissing`).
    pub verdict: u8,
    /// [`HOOK_CONNECT`] or [`HOOK_SENDMSG`].
    pub hook: u8,
    /// Service id (0 when the VIP has no service on that port).
    pub service_id: u32,
    /// Backend id (0 when refused).
    pub backend_id: u32,
    /// `AFFINITY_*`.
    pub affinity: u8,
    pub _pad: [u8; 7],
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 80);

/// Token bucket of one CPU for event output.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// Events that may still be sent.
    pub tokens: u64,
    /// When the bucket was last refilled (`bpf_ktime_get_ns`).
    pub refilled_ns: u64,
}
const _: () = assert!(core::mem::size_of::<EventBudget>() == 16);

/// Index of the flow-events switch in the settings array (1 = on).
pub const SETTING_FLOW_EVENTS: u32 = 0;
/// Index of the eBPF debug-log switch in the settings array (1 = on).
pub const SETTING_DEBUG_LOG: u32 = 1;
/// Size of the settings array.
pub const SETTINGS_MAX: u32 = 8;
