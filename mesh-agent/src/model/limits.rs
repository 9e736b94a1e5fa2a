//! The limits a service must fit: weights, names, affinity timeouts, and how many backends
//! (and slots) each policy's table holds.

use super::LbPolicy;

/// Seconds an affinity entry lives without use when nothing says otherwise (3 hours, as
/// Kubernetes' `sessionAffinityConfig` default).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The longest affinity timeout accepted: one week.
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400 * 7;
/// The largest backend weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Longest service name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;
/// Longest node name (it names a directory under `/sys/fs/bpf/mesh/`).
pub const MAX_NODE_NAME_LEN: usize = 64;

/// Most slots a `weighted` table spreads its weights over (a prime, like a small Maglev table,
/// though nothing depends on that).
pub const WEIGHTED_MAX_SLOTS: usize = 1021;

/// The Maglev table sizes, all prime, smallest first.
pub const MAGLEV_TABLE_SIZES: [u32; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// Entries per backend a Maglev table aims for; fewer make shares uneven and disruption larger.
pub const MAGLEV_ENTRIES_PER_BACKEND: u32 = 10;

/// The most backends (with nonzero weight) a Maglev table can hold at
/// [`MAGLEV_ENTRIES_PER_BACKEND`].
pub const MAGLEV_MAX_BACKENDS: usize =
    (MAGLEV_TABLE_SIZES[MAGLEV_TABLE_SIZES.len() - 1] / MAGLEV_ENTRIES_PER_BACKEND) as usize;

/// The Maglev table size for `backends` backends with nonzero weight: the smallest of
/// [`MAGLEV_TABLE_SIZES`] that gives each at least [`MAGLEV_ENTRIES_PER_BACKEND`] entries.
/// Beyond [`MAGLEV_MAX_BACKENDS`] it stays at the largest size (the rules refuse that many).
pub fn maglev_table_size(backends: usize) -> u32 {
    let want = (backends as u64).saturating_mul(u64::from(MAGLEV_ENTRIES_PER_BACKEND));
    MAGLEV_TABLE_SIZES
        .iter()
        .copied()
        .find(|&m| u64::from(m) >= want)
        .unwrap_or(MAGLEV_TABLE_SIZES[MAGLEV_TABLE_SIZES.len() - 1])
}

impl LbPolicy {
    /// The most backends with nonzero weight this policy's table holds (`None`: no limit but
    /// the maps'), and why, for people.
    pub const fn backend_limit(self) -> Option<(usize, &'static str)> {
        match self {
            LbPolicy::Random => None,
            LbPolicy::Weighted => Some((
                WEIGHTED_MAX_SLOTS,
                r#"lb = "weighted" spreads at most that many slots; use "maglev" or "random""#,
            )),
            LbPolicy::Maglev => Some((
                MAGLEV_MAX_BACKENDS,
                "a Maglev table holds at most 65521 entries, 10 per backend; use \"random\"",
            )),
        }
    }
}

/// How many slots the table of backends of these weights takes under `policy` (for capacity
/// checks; `balance::build_table` makes exactly that many).
///
/// `weighted`: the weights divided by their gcd if they sum to at most
/// [`WEIGHTED_MAX_SLOTS`], else exactly that many (one each when there are more backends
/// than that).
pub fn slot_count(policy: LbPolicy, weights: impl IntoIterator<Item = u32>) -> usize {
    let weights: Vec<u32> = weights.into_iter().collect();
    let active = weights.iter().filter(|&&w| w > 0).count();
    match policy {
        LbPolicy::Random => active,
        LbPolicy::Weighted => {
            let g = weights.iter().fold(0u32, |g, &w| gcd(g, w));
            if g == 0 {
                return 0;
            }
            let total: u64 = weights.iter().map(|&w| u64::from(w / g)).sum();
            if active >= WEIGHTED_MAX_SLOTS {
                active
            } else {
                total.min(WEIGHTED_MAX_SLOTS as u64) as usize
            }
        }
        LbPolicy::Maglev if active == 0 => 0,
        LbPolicy::Maglev => maglev_table_size(active) as usize,
    }
}

/// The greatest common divisor (`gcd(0, w) = w`).
pub fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_counts() {
        assert_eq!(slot_count(LbPolicy::Random, [1, 0, 7, 1]), 3);
        assert_eq!(slot_count(LbPolicy::Weighted, [300, 100, 0, 200]), 6);
        assert_eq!(slot_count(LbPolicy::Weighted, [0, 0]), 0);
        assert_eq!(
            slot_count(LbPolicy::Weighted, [10_000, 9_999]),
            WEIGHTED_MAX_SLOTS
        );
        assert_eq!(slot_count(LbPolicy::Weighted, vec![3; 2000]), 2000);
        assert_eq!(slot_count(LbPolicy::Maglev, [1, 0, 1]), 251);
        assert_eq!(slot_count(LbPolicy::Maglev, [0]), 0);
    }

    #[test]
    fn backend_limits() {
        assert_eq!(LbPolicy::Random.backend_limit(), None);
        assert_eq!(LbPolicy::Weighted.backend_limit().unwrap().0, 1021);
        assert_eq!(LbPolicy::Maglev.backend_limit().unwrap().0, 6552);
    }
}
