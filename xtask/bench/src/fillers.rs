//! Filler catalogs: many services of [`BACKENDS`] backends each, for the suites that load a
//! large config into an agent (`reload`, `scale`). Nothing connects to them; their size is
//! the point.

use std::net::{Ipv4Addr, SocketAddr};

use mesh_tests::config::Service;

use crate::iptables;

/// Backends per filler service.
pub const BACKENDS: u8 = 10;

/// The backends every filler has: `10.200.0.1..=10:8080`, on no host.
pub fn backends() -> Vec<SocketAddr> {
    (1..=BACKENDS)
        .map(|n| SocketAddr::new(Ipv4Addr::new(10, 200, 0, n).into(), 8080))
        .collect()
}

/// `count` services `filler0`, `filler1`, … on the iptables suite's filler VIPs (port 80),
/// each with the same [`backends`].
pub fn services(count: u32) -> Vec<Service> {
    let backends = backends();
    (0..count)
        .map(|n| {
            let vip = SocketAddr::new(iptables::filler_vip(n).into(), 80);
            Service::tcp(&format!("filler{n}"), vip, &backends)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fillers_have_distinct_vips_and_ten_backends() {
        let fillers = services(300);
        let vips: std::collections::HashSet<_> = fillers.iter().map(|s| &s.vip).collect();
        assert_eq!(vips.len(), 300);
        assert!(fillers.iter().all(|s| s.backends.len() == 10));
    }
}
