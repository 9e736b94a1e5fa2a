//! Passive health: connect outcomes per backend, seen by the kernel.
//!
//! `sock_ops` watches the TCP sockets the balancer sent to a backend (those with a reverse
//! record): an established connection counts as `established`; a socket that leaves SYN-SENT
//! for CLOSE (reset, SYN retries exhausted, or abandoned) counts as `failed`; each SYN
//! retransmission timeout counts as `syn_timeouts`. The agent reads the per-CPU sums keyed by
//! backend address ([`crate::redirect::SockKey`]) and ejects outliers.

/// Counts of one backend on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectOutcomes {
    pub established: u64,
    pub failed: u64,
    pub syn_timeouts: u64,
}
const _: () = assert!(core::mem::size_of::<ConnectOutcomes>() == 24);
