//! Per-reason counters of the kernel programs.
//!
//! The programs bump one per-CPU `u64` per decision; the agent sums the CPUs and shows them in
//! `mesh-agent status`. The index is the reason, so adding one appends to [`Counter::ALL`].

/// Why a program did what it did. The discriminant is the index in the counters map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counter {
    /// A connect or sendmsg to a VIP was sent to a backend.
    Rewritten = 0,
    /// The service exists but has no backend: refused with `ECONNREFUSED`.
    NoBackend = 1,
    /// The address is a VIP but no service listens on that port and protocol: refused.
    NoServicePort = 2,
    /// The destination is no VIP: left alone.
    Passthrough = 3,
    /// A client with affinity went back to its remembered backend.
    AffinityHit = 4,
    /// A client with affinity had no usable remembered backend and got a new one.
    AffinityMiss = 5,
    /// `getpeername` or `recvmsg` showed the VIP instead of the backend.
    ReverseHit = 6,
    /// A slot or backend entry that the header promised was missing (an update raced).
    SlotMissing = 7,
    /// A map update failed (a full map); the socket went on without the reverse record.
    MapUpdateFailed = 8,
    /// A flow event was dropped: over the rate bound, or the ring buffer was full.
    EventDropped = 9,
    /// A connect to an mTLS service was sent to the agent's outbound listener.
    MtlsRedirected = 10,
    /// A socket of the agent itself (marked `AGENT_MARK`) was left alone.
    AgentSocket = 11,
    /// A plaintext connection opening to a strict service's backend was dropped.
    StrictDropped = 12,
    /// A balanced TCP connect failed (reset, timeout or abandoned in SYN-SENT).
    ConnectFailed = 13,
    /// A connect to an mTLS service was refused: no agent listens for it (fail closed).
    MtlsNoAgent = 14,
    /// A message on the loopback hop between an application and the agent's outbound listener
    /// went straight to the peer socket (sockmap redirect), skipping loopback TCP.
    LoopbackRedirected = 15,
}

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; 16] = [
        Counter::Rewritten,
        Counter::NoBackend,
        Counter::NoServicePort,
        Counter::Passthrough,
        Counter::AffinityHit,
        Counter::AffinityMiss,
        Counter::ReverseHit,
        Counter::SlotMissing,
        Counter::MapUpdateFailed,
        Counter::EventDropped,
        Counter::MtlsRedirected,
        Counter::AgentSocket,
        Counter::StrictDropped,
        Counter::ConnectFailed,
        Counter::MtlsNoAgent,
        Counter::LoopbackRedirected,
    ];

    /// Number of counters in use; the array has room for [`crate::maps::COUNTERS_MAX`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The name shown by `mesh-agent status` and used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Rewritten => "forwarded",
            Counter::NoBackend => "no_backend",
            Counter::NoServicePort => "no_service_port",
            Counter::Passthrough => "passthrough",
            Counter::AffinityHit => "affinity_hit",
            Counter::AffinityMiss => "affinity_miss",
            Counter::ReverseHit => "reverse_hit",
            Counter::SlotMissing => "slot_missing",
            Counter::MapUpdateFailed => "map_update_failed",
            Counter::EventDropped => "events_dropped",
            Counter::MtlsRedirected => "mtls_redirected",
            Counter::AgentSocket => "agent_socket",
            Counter::StrictDropped => "strict_dropped",
            Counter::ConnectFailed => "connect_failed",
            Counter::MtlsNoAgent => "mtls_no_agent",
            Counter::LoopbackRedirected => "loopback_redirected",
        }
    }
}

const _: () = assert!(Counter::COUNT <= crate::maps::COUNTERS_MAX);

impl Counter {
    /// The counter at `index`, if any (flow events carry the index as their verdict).
    pub const fn from_index(index: u8) -> Option<Counter> {
        let index = index as usize;
        if index < Self::ALL.len() {
            Some(Self::ALL[index])
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Counter;

    #[test]
    fn indices_round_trip_and_names_are_unique() {
        for (index, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index);
            assert_eq!(Counter::from_index(index as u8), Some(*counter));
        }
        assert_eq!(Counter::from_index(Counter::COUNT as u8), None);
        for (i, a) in Counter::ALL.iter().enumerate() {
            for b in &Counter::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
