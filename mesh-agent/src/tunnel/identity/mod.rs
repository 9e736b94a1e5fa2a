//! Who is who in the tunnel: SPIFFE ids, the trust domain's CA and certificate issuing, the
//! credentials loaded from files (reloaded on change), and which identity a client cgroup
//! has.

pub mod ca;
pub mod certs;
pub mod spiffe;
pub mod workload;
