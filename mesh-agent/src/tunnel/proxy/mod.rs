//! Carrying flows through the tunnel: CONNECT framing, the pooled h2-over-TLS connections,
//! the outbound and inbound listeners, the byte relay, limits, stats and the drain.

pub mod connect;
pub mod drain;
pub mod inbound;
pub mod limits;
pub mod outbound;
pub mod pool;
pub mod relay;
pub mod socket;
pub mod stats;
pub mod tuning;
