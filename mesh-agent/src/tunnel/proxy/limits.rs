//! Bounds on the inbound tunnel's connections: in total and per peer address, taken before the
//! TLS handshake so that neither strangers nor a certificate holder can hold the agent's
//! descriptors and memory. (Streams per connection are bounded by HTTP/2's
//! `max_concurrent_streams`, [`crate::tunnel::proxy::tuning::MAX_STREAMS`].)

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

/// Inbound tunnel connections open at once, from all peers.
pub const MAX_CONNECTIONS: usize = 4_096;
/// Inbound tunnel connections open at once from one peer address (the pool opens one per
/// identity it sends as, usually one or a few).
pub const MAX_PER_PEER: usize = 64;

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverLimit {
    Total,
    PerPeer,
}

impl OverLimit {
    /// The `mesh_mtls_handshakes_total` result it is counted as.
    pub fn label(self) -> &'static str {
        match self {
            OverLimit::Total => "over_total_limit",
            OverLimit::PerPeer => "over_peer_limit",
        }
    }
}

/// The open connections, by peer address.
#[derive(Debug)]
pub struct ConnectionLimits {
    total: usize,
    per_peer: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; it leaves the counts when dropped.
#[derive(Debug)]
pub struct Admitted {
    limits: Arc<ConnectionLimits>,
    peer: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.limits.lock();
        if let Some(n) = open.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

impl ConnectionLimits {
    pub fn new(total: usize, per_peer: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            total,
            per_peer,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits a connection from `peer`, unless a bound is reached.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Admitted, OverLimit> {
        let mut open = self.lock();
        if open.values().sum::<usize>() >= self.total {
            return Err(OverLimit::Total);
        }
        let n = open.entry(peer).or_default();
        if *n >= self.per_peer {
            return Err(OverLimit::PerPeer);
        }
        *n += 1;
        drop(open);
        Ok(Admitted {
            limits: Arc::clone(self),
            peer,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bound_holds_and_a_closed_connection_frees_its_place() {
        let limits = ConnectionLimits::new(3, 2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = limits.admit(a).unwrap();
        let _a2 = limits.admit(a).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), OverLimit::PerPeer);
        let _b1 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(b).unwrap_err(), OverLimit::Total);
        drop(a1);
        let _b2 = limits.admit(b).unwrap();
        assert_eq!(limits.admit(a).unwrap_err(), OverLimit::Total);
    }
}
