//! The `lb` benchmark suite: new TCP connections/s, request/response rate and bulk throughput
//! through a service VIP, compared with going straight to the backend and with kube-proxy-style
//! iptables DNAT, at 1 and at many services.
//!
//! Runs after setup and a release build; the binaries are in `<root>/target/release/`.

use std::path::Path;

use anyhow::Result;

/// Runs the suite and prints its results.
pub fn run(root: &Path) -> Result<()> {
    let _ = root;
    anyhow::bail!("bench lb: not implemented yet")
}
