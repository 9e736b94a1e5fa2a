//! Who is who in the tunnel: the trust domain's CA and certificate issuing, the credentials
//! loaded from files (reloaded on change), and which identity a client cgroup has (the
//! SPIFFE ids themselves are [`crate::model::identity`]).

pub mod ca;
pub mod certs;
pub mod workload;
