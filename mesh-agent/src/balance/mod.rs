//! The kernel state the agent wants, computed from a validated config.
//!
//! This module owns the translation from "services with backends and a policy" to what the
//! maps must hold, in the model's terms: each service's frontend, policy, affinity, whether it
//! is strict, and its slot table, a list of indices into the service's backends that the
//! kernel picks from. It is pure and knows no kernel encoding: map keys, `LB_*` values and flag
//! bits are [`crate::reconcile`]'s, which also assigns the ids and writes the maps.
//!
//! Tables, by policy:
//!
//! * `random`: each backend with nonzero weight once (the kernel's `LB_RANDOM`).
//! * `weighted`: weights divided by their gcd; if they still sum to more than
//!   [`WEIGHTED_MAX_SLOTS`], apportioned into that many slots by largest remainder, every
//!   backend keeping at least one. The kernel picks a slot uniformly (`LB_RANDOM`), so a
//!   backend's chance is its share of the slots.
//! * `maglev`: the weighted Maglev table of [`crate::balance::maglev`] (`LB_MAGLEV`).
//!
//! `random` and `weighted` tables list backends in address order, so reordering the config's
//! backends changes nothing in the kernel.

pub mod maglev;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use self::maglev::MaglevBackend;
#[cfg(test)]
use crate::config::Config;
use crate::model::limits::gcd;
// How many slots a table takes is a limit of the model (the config checks capacity with it).
pub use crate::model::limits::{slot_count, WEIGHTED_MAX_SLOTS};
use crate::model::{Affinity, Frontend, LbPolicy, Protocol, Service};

/// Every service the kernel should serve, by frontend. Each service is shared: a copy of the
/// whole state costs one reference count per service, and a stage that changes one service
/// (health masking its table, an event that touched it) copies that one only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<Frontend, Arc<DesiredService>>,
}

/// One service as the kernel should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    /// The policy the table was built for.
    pub policy: LbPolicy,
    pub affinity: Affinity,
    pub affinity_timeout_s: u32,
    /// Strict mTLS: clients are sent to the agent's tunnel, and only the agent may open
    /// connections to the backends.
    pub strict: bool,
    /// Every configured backend, drained ones (weight 0) included.
    pub backends: Vec<DesiredBackend>,
    /// The slot table: indices into [`Self::backends`]. Never names a drained backend; empty
    /// when no backend has weight (the kernel then refuses connects).
    pub table: Vec<u32>,
}

/// One backend of a [`DesiredService`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: SocketAddr,
    /// 0 = drained.
    pub weight: u32,
}

impl Desired {
    /// Services by name (a service's VIP markers are not services of their own).
    pub fn service_count(&self) -> usize {
        self.services
            .values()
            .map(|s| s.name.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    }

    /// The desired state of a validated config (the agent goes through
    /// [`crate::catalog::Catalog::desired`], which gives the same for a single node).
    #[cfg(test)]
    pub fn from_config(config: &Config) -> Desired {
        let mut desired = Desired::default();
        for service in &config.services {
            desired.insert(DesiredService::from_config(service));
        }
        desired
    }

    /// Add or replace the service at `service.frontend()`; returns the one it replaced.
    pub fn insert(&mut self, service: DesiredService) -> Option<Arc<DesiredService>> {
        self.services.insert(service.frontend(), Arc::new(service))
    }
}

impl DesiredService {
    /// The desired state of one validated service.
    pub fn from_config(config: &Service) -> DesiredService {
        let backends: Vec<DesiredBackend> = config
            .backends
            .iter()
            .map(|b| DesiredBackend {
                addr: b.address,
                weight: b.weight,
            })
            .collect();
        let table = build_table(config.lb, &backends);
        DesiredService {
            name: config.name.clone(),
            vip: config.vip,
            port: config.port,
            protocol: config.protocol,
            policy: config.lb,
            affinity: config.affinity,
            affinity_timeout_s: config.affinity_timeout_s,
            strict: config.mtls,
            backends,
            table,
        }
    }

    /// What clients connect to.
    pub fn frontend(&self) -> Frontend {
        Frontend {
            vip: self.vip,
            port: self.port,
            protocol: self.protocol,
        }
    }

    /// The backend each slot names, in slot order (what a test expects the kernel to resolve).
    #[cfg(test)]
    pub fn table_addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.table
            .iter()
            .filter_map(|&i| self.backends.get(i as usize).map(|b| b.addr))
    }
}

/// The slot table of `backends` under `policy`: indices into `backends`.
pub fn build_table(policy: LbPolicy, backends: &[DesiredBackend]) -> Vec<u32> {
    match policy {
        LbPolicy::Random => by_address(backends)
            .into_iter()
            .filter(|&i| backends[i].weight > 0)
            .map(|i| i as u32)
            .collect(),
        LbPolicy::Weighted => {
            let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
            let counts = apportion(&weights, WEIGHTED_MAX_SLOTS);
            let mut table = Vec::with_capacity(counts.iter().map(|&c| c as usize).sum());
            for i in by_address(backends) {
                table.extend(std::iter::repeat_n(i as u32, counts[i] as usize));
            }
            table
        }
        LbPolicy::Maglev => {
            let names: Vec<String> = backends.iter().map(|b| b.addr.to_string()).collect();
            let input: Vec<MaglevBackend<'_>> = names
                .iter()
                .zip(backends)
                .map(|(name, b)| MaglevBackend {
                    name,
                    weight: b.weight,
                })
                .collect();
            maglev::build(&input)
        }
    }
}

fn by_address(backends: &[DesiredBackend]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i].addr);
    order
}

/// Slots per backend for `weights`: the weights divided by their gcd if they then fit in
/// `budget` slots, else exactly `budget` slots shared by largest remainder, with every nonzero
/// weight getting at least one (so a backend is never starved by rounding). Zero stays zero.
/// With more nonzero weights than `budget`, each gets one slot (the config refuses that).
pub fn apportion(weights: &[u32], budget: usize) -> Vec<u32> {
    let g = weights.iter().fold(0u32, |g, &w| gcd(g, w));
    if g == 0 {
        return vec![0; weights.len()];
    }
    let reduced: Vec<u64> = weights.iter().map(|&w| u64::from(w / g)).collect();
    let total: u64 = reduced.iter().sum();
    let active = reduced.iter().filter(|&&w| w > 0).count();
    if total <= budget as u64 || active >= budget {
        return reduced
            .iter()
            .map(|&w| {
                if active >= budget {
                    u32::from(w > 0)
                } else {
                    w as u32
                }
            })
            .collect();
    }

    // Backends whose exact share is under one slot get one; the rest share what is left. Fixing
    // one shrinks the others' shares, so repeat until no share is under one.
    let mut counts = vec![0u32; weights.len()];
    let mut fixed = vec![false; weights.len()];
    let (mut left, mut weight_left) = (budget as u64, total);
    loop {
        let mut changed = false;
        for i in 0..reduced.len() {
            if reduced[i] > 0
                && !fixed[i]
                && u128::from(reduced[i]) * u128::from(left) < u128::from(weight_left)
            {
                fixed[i] = true;
                counts[i] = 1;
                left -= 1;
                weight_left -= reduced[i];
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    if weight_left == 0 {
        return counts;
    }
    let mut remainders: Vec<(u128, usize)> = Vec::new();
    let mut given = 0u64;
    for i in 0..reduced.len() {
        if reduced[i] == 0 || fixed[i] {
            continue;
        }
        let exact = u128::from(reduced[i]) * u128::from(left);
        let floor = exact / u128::from(weight_left);
        counts[i] = floor as u32;
        given += floor as u64;
        remainders.push((exact % u128::from(weight_left), i));
    }
    // Largest remainder first; ties to the backend listed first.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take((left - given) as usize) {
        counts[i] += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn backends(weights: &[u32]) -> Vec<DesiredBackend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| DesiredBackend {
                addr: SocketAddr::from(([10, 0, (i / 200) as u8, (i % 200) as u8 + 1], 80)),
                weight,
            })
            .collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u32> {
        let mut c = vec![0; n];
        for &i in table {
            c[i as usize] += 1;
        }
        c
    }

    #[test]
    fn from_config() {
        let c = Config::parse(
            r#"
[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
lb = "weighted"
affinity = true
backends = [
  { address = "10.0.0.3:80", weight = 200 },
  { address = "10.0.0.2:80", weight = 100 },
  { address = "10.0.0.4:80", weight = 0 },
]
[[services]]
name = "dns"
vip = "10.96.0.53"
port = 53
protocol = "udp"
lb = "maglev"
backends = [{ address = "10.0.0.5:53" }]
"#,
            "t.toml",
        )
        .unwrap();
        let d = Desired::from_config(&c);
        assert_eq!(d.services.len(), 2);
        let web = d.services.values().find(|s| s.name == "web").unwrap();
        assert_eq!(web.policy, LbPolicy::Weighted);
        assert_eq!(web.affinity, Affinity::Cgroup);
        assert!(!web.strict);
        assert_eq!(web.affinity_timeout_s, 10_800);
        // gcd 100: 2:1, address order (10.0.0.2 first), drained one absent.
        assert_eq!(web.table, vec![1, 0, 0]);
        assert_eq!(web.frontend().to_string(), "10.96.0.10:80/tcp");
        // (Its kernel encoding: reconcile's tests, `kernel_encoding_of_a_desired_service`.)
        let dns = d.services.values().find(|s| s.name == "dns").unwrap();
        assert_eq!(dns.protocol, Protocol::Udp);
        assert_eq!(dns.policy, LbPolicy::Maglev);
        assert_eq!(dns.table.len(), 251);
        assert!(dns.table.iter().all(|&i| i == 0));
    }

    #[test]
    fn random_lists_each_live_backend_once() {
        let b = backends(&[1, 0, 7, 1]);
        assert_eq!(build_table(LbPolicy::Random, &b), vec![0, 2, 3]);
        assert_eq!(slot_count(LbPolicy::Random, [1, 0, 7, 1]), 3);
        assert!(build_table(LbPolicy::Random, &backends(&[0, 0])).is_empty());
        assert!(build_table(LbPolicy::Random, &[]).is_empty());
    }

    #[test]
    fn weighted_reduces_by_gcd() {
        let b = backends(&[300, 100, 0, 200]);
        let t = build_table(LbPolicy::Weighted, &b);
        assert_eq!(counts(&t, 4), vec![3, 1, 0, 2]);
        assert_eq!(slot_count(LbPolicy::Weighted, [300, 100, 0, 200]), 6);
        assert_eq!(apportion(&[0, 0], 1021), vec![0, 0]);
        assert_eq!(apportion(&[5], 1021), vec![1]);
    }

    #[test]
    fn weighted_apportions_large_weights() {
        // Coprime weights summing past the budget: exactly the budget, ratios kept.
        let w = [10_000, 9_999, 1, 3_333];
        let c = apportion(&w, WEIGHTED_MAX_SLOTS);
        assert_eq!(c.iter().sum::<u32>() as usize, WEIGHTED_MAX_SLOTS);
        assert_eq!(c[2], 1, "the tiny weight keeps a slot");
        let total: u32 = w.iter().sum();
        for i in [0, 1, 3] {
            let ideal = f64::from(w[i]) * WEIGHTED_MAX_SLOTS as f64 / f64::from(total);
            assert!(
                (f64::from(c[i]) - ideal).abs() <= 1.0,
                "{i}: {} vs {ideal}",
                c[i]
            );
        }
        // Many small ones pushed to one slot each.
        let mut w = vec![1; 600];
        w.push(10_000);
        w.push(9_999);
        let c = apportion(&w, WEIGHTED_MAX_SLOTS);
        assert_eq!(c.iter().sum::<u32>() as usize, WEIGHTED_MAX_SLOTS);
        assert!(c[..600].iter().all(|&x| x == 1));
        assert_eq!(c[600] + c[601], 421);
        assert!(c[600] >= c[601]);
        // As many backends as slots: one each.
        let alternating: Vec<u32> = (0..1021).map(|i| 3 + i % 2).collect();
        let c = apportion(&alternating, 1021);
        assert!(c.iter().all(|&x| x == 1));
    }

    #[test]
    fn maglev_table_excludes_drained() {
        let b = backends(&[1, 0, 1]);
        let t = build_table(LbPolicy::Maglev, &b);
        assert_eq!(t.len(), 251);
        let c = counts(&t, 3);
        assert_eq!(c[1], 0);
        assert!(c[0] > 100 && c[2] > 100);
        assert_eq!(slot_count(LbPolicy::Maglev, [1, 0, 1]), 251);
        assert_eq!(slot_count(LbPolicy::Maglev, [0]), 0);
        assert!(build_table(LbPolicy::Maglev, &backends(&[0])).is_empty());
    }

    #[test]
    fn slot_count_matches_tables() {
        for weights in [
            &[1u32, 2, 3][..],
            &[0, 0],
            &[10_000, 1, 7_777],
            &[4, 4, 4, 4],
        ] {
            let b = backends(weights);
            for lb in [LbPolicy::Random, LbPolicy::Weighted, LbPolicy::Maglev] {
                assert_eq!(
                    slot_count(lb, weights.iter().copied()),
                    build_table(lb, &b).len(),
                    "{lb} {weights:?}"
                );
            }
        }
    }

    #[test]
    fn backend_order_does_not_change_the_table() {
        let b = backends(&[1, 2, 3]);
        for lb in [LbPolicy::Random, LbPolicy::Weighted, LbPolicy::Maglev] {
            let a: Vec<SocketAddr> = build_table(lb, &b)
                .iter()
                .map(|&i| b[i as usize].addr)
                .collect();
            let mut r = b.clone();
            r.reverse();
            let z: Vec<SocketAddr> = build_table(lb, &r)
                .iter()
                .map(|&i| r[i as usize].addr)
                .collect();
            assert_eq!(a, z, "{lb}");
        }
    }
}
