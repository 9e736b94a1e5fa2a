//! Maglev lookup tables (Eisenbud et al., NSDI 2016), with weights.
//!
//! This module owns the population of one service's table: given its backends' names and
//! weights it returns, for each of the `M` entries, the index of the backend that owns it. The
//! kernel indexes the table with [`mesh_common::hash::client_hash`] of the client; this module
//! does not know about clients, maps or slots.
//!
//! Each backend walks its own permutation of `0..M` (`offset + j * skip mod M`, offset and skip
//! from two independent hashes of its name) and, on each of its turns, claims the next entry of
//! its permutation that is still free. With weights, turns come in proportion to weight: the
//! backend with weight `w` takes its `k`-th turn at time `k / w`, so after the table fills each
//! backend holds `w / Σw` of it to within one entry. With equal weights this is the paper's
//! round-robin. The hashes are fixed (FNV-1a finished with SplitMix64), so every agent on every
//! host builds the same table from the same backends.
//!
//! Disruption: with about 25 entries per backend (small tables), removing one of ten backends
//! moves its tenth of the entries plus about 5% more; larger tables come closer to the minimum.
//! A change of table size (25 ↔ 26 backends, 50 ↔ 51, …) rebuilds the table and moves about
//! half of it.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

// The table sizes and the backend limit are limits of the model (the config and the catalog
// check them without building a table).
pub use crate::model::limits::{
    maglev_table_size as table_size, MAGLEV_ENTRIES_PER_BACKEND as ENTRIES_PER_BACKEND,
    MAGLEV_MAX_BACKENDS as MAX_BACKENDS, MAGLEV_TABLE_SIZES as TABLE_SIZES,
};

/// One backend offered to [`build`].
#[derive(Debug, Clone, Copy)]
pub struct MaglevBackend<'a> {
    /// A name that identifies the backend the same way on every host (its `IP:port`); the
    /// backend's place in the table depends only on it, not on its position in the list.
    pub name: &'a str,
    /// Relative share; 0 keeps the backend out of the table.
    pub weight: u32,
}

/// The Maglev table for `backends`: `table_size(n)` entries, each an index into `backends`,
/// where `n` counts backends with nonzero weight. Empty when no backend has a weight.
pub fn build(backends: &[MaglevBackend<'_>]) -> Vec<u32> {
    let mut active: Vec<usize> = (0..backends.len())
        .filter(|&i| backends[i].weight > 0)
        .collect();
    // Turns due at the same time go in name order, so the table does not depend on the order
    // the backends were listed in.
    active.sort_by(|&a, &b| backends[a].name.cmp(backends[b].name).then(a.cmp(&b)));
    if active.is_empty() {
        return Vec::new();
    }
    let m = table_size(active.len());
    let m64 = u64::from(m);

    struct Walker {
        index: u32,
        weight: u64,
        offset: u64,
        skip: u64,
        /// Position in the permutation of the next entry to try.
        next: u64,
        /// Turns taken so far.
        turns: u64,
    }
    let mut walkers: Vec<Walker> = active
        .iter()
        .map(|&i| {
            let name = backends[i].name.as_bytes();
            Walker {
                index: i as u32,
                weight: u64::from(backends[i].weight),
                offset: hash(OFFSET_SEED, name) % m64,
                skip: hash(SKIP_SEED, name) % (m64 - 1) + 1,
                next: 0,
                turns: 0,
            }
        })
        .collect();

    let mut table: Vec<Option<u32>> = vec![None; m as usize];
    let mut heap: BinaryHeap<Turn> = (0..walkers.len())
        .map(|w| Turn {
            turns: 0,
            weight: walkers[w].weight,
            walker: w,
        })
        .collect();
    let mut filled = 0usize;
    while filled < table.len() {
        let Some(turn) = heap.pop() else { break };
        let walker = &mut walkers[turn.walker];
        // Every permutation visits every entry (M is prime, 0 < skip < M), so this finds a free
        // one within M steps while the table is not full.
        loop {
            let entry = ((walker.offset + walker.next * walker.skip) % m64) as usize;
            walker.next += 1;
            if table[entry].is_none() {
                table[entry] = Some(walker.index);
                filled += 1;
                break;
            }
        }
        walker.turns += 1;
        heap.push(Turn {
            turns: walker.turns,
            weight: walker.weight,
            walker: turn.walker,
        });
    }
    table.into_iter().map(|e| e.unwrap_or(0)).collect()
}

/// A backend's next turn, due at time `turns / weight`. The heap pops the earliest; ties go to
/// the backend whose name sorts first, so the order is total and the table deterministic.
#[derive(PartialEq, Eq)]
struct Turn {
    turns: u64,
    weight: u64,
    walker: usize,
}

impl Ord for Turn {
    fn cmp(&self, other: &Self) -> Ordering {
        // a/wa < b/wb  <=>  a*wb < b*wa (weights are nonzero); reversed for the max-heap.
        let mine = u128::from(self.turns) * u128::from(other.weight);
        let theirs = u128::from(other.turns) * u128::from(self.weight);
        theirs
            .cmp(&mine)
            .then_with(|| other.walker.cmp(&self.walker))
    }
}

impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

const OFFSET_SEED: u64 = 0x6d65_7368_6f66_6673; // "meshoffs"
const SKIP_SEED: u64 = 0x6d65_7368_736b_6970; // "meshskip"

/// FNV-1a over `seed` and `bytes`, finished with SplitMix64 so that every input bit reaches
/// every output bit (FNV alone leaves the low bits weak, and we take it modulo M).
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for &b in seed.to_le_bytes().iter().chain(bytes) {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    let mut z = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.200.{}.{}:8080", i / 250, i % 250 + 1))
            .collect()
    }

    fn backends<'a>(names: &'a [String], weights: &[u32]) -> Vec<MaglevBackend<'a>> {
        names
            .iter()
            .zip(weights)
            .map(|(name, &weight)| MaglevBackend { name, weight })
            .collect()
    }

    fn shares(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &e in table {
            counts[e as usize] += 1;
        }
        counts
    }

    #[test]
    fn sizes() {
        assert_eq!(table_size(0), 251);
        assert_eq!(table_size(1), 251);
        assert_eq!(table_size(25), 251);
        assert_eq!(table_size(26), 509);
        assert_eq!(table_size(MAX_BACKENDS), 65521);
        assert_eq!(MAX_BACKENDS, 6552);
        assert_eq!(table_size(MAX_BACKENDS + 1), 65521);
    }

    #[test]
    fn every_entry_filled_by_an_active_backend() {
        let n = names(30);
        let mut weights = vec![1; 30];
        weights[4] = 0;
        let table = build(&backends(&n, &weights));
        assert_eq!(table.len(), table_size(29) as usize);
        assert!(table.iter().all(|&e| (e as usize) < 30 && e != 4));
        // All of them own something.
        let counts = shares(&table, 30);
        assert!(counts
            .iter()
            .enumerate()
            .all(|(i, &c)| (i == 4) == (c == 0)));
    }

    #[test]
    fn no_weight_no_table() {
        let n = names(3);
        assert!(build(&backends(&n, &[0, 0, 0])).is_empty());
        assert!(build(&[]).is_empty());
    }

    #[test]
    fn equal_shares_within_five_percent() {
        // Large enough shares for 5% to be more than one entry.
        for count in [1, 2, 3, 5, 7, 10] {
            let n = names(count);
            let table = build(&backends(&n, &vec![1; count]));
            let ideal = table.len() as f64 / count as f64;
            for (i, &c) in shares(&table, count).iter().enumerate() {
                let dev = (c as f64 - ideal).abs() / ideal;
                assert!(dev <= 0.05, "{count} backends: #{i} has {c}, ideal {ideal}");
            }
        }
        // Any size: within one entry.
        for count in [11, 26, 100, 1000] {
            let n = names(count);
            let table = build(&backends(&n, &vec![1; count]));
            let ideal = table.len() as f64 / count as f64;
            for (i, &c) in shares(&table, count).iter().enumerate() {
                assert!(
                    (c as f64 - ideal).abs() < 1.0,
                    "{count} backends: #{i} has {c}, ideal {ideal}"
                );
            }
        }
    }

    #[test]
    fn weighted_shares_within_five_percent() {
        let n = names(4);
        for weights in [[1, 3, 1, 3], [1, 1, 1, 3], [10, 30, 20, 40]] {
            let table = build(&backends(&n, &weights));
            let total: u32 = weights.iter().sum();
            for (i, &c) in shares(&table, 4).iter().enumerate() {
                let ideal = table.len() as f64 * f64::from(weights[i]) / f64::from(total);
                let dev = (c as f64 - ideal).abs() / ideal;
                assert!(dev <= 0.05, "{weights:?}: #{i} has {c}, ideal {ideal}");
            }
        }
    }

    #[test]
    fn extreme_weights_still_give_everyone_an_entry() {
        let n = names(3);
        let table = build(&backends(&n, &[10_000, 1, 10_000]));
        assert!(shares(&table, 3).iter().all(|&c| c >= 1));
    }

    #[test]
    fn deterministic_and_independent_of_list_order() {
        let n = names(10);
        let a = build(&backends(&n, &[1; 10]));
        assert_eq!(a, build(&backends(&n, &[1; 10])));
        // Reversing the list renames indices but not who owns which entry.
        let rev: Vec<String> = n.iter().rev().cloned().collect();
        let b = build(&backends(&rev, &[1; 10]));
        let owner_a: Vec<&str> = a.iter().map(|&i| n[i as usize].as_str()).collect();
        let owner_b: Vec<&str> = b.iter().map(|&i| rev[i as usize].as_str()).collect();
        assert_eq!(owner_a, owner_b);
        // Pinned: a change to the hash or the population changes every host's table.
        assert_eq!(hash(OFFSET_SEED, b"10.200.0.1:8080"), 0x4742_7e1e_6c30_7351);
    }

    /// Maglev's disruption is near the minimum, not at it: with ~25 entries per backend (the
    /// table size rule gives 251 entries to 10 backends) removing one of ten moves its 10% and,
    /// on average, about 5% more as the others' turns shift.
    #[test]
    fn removing_one_of_ten_moves_about_a_tenth() {
        let (mut total, mut trials) = (0.0, 0.0);
        for set in 0..5 {
            let n: Vec<String> = (0..10).map(|i| format!("10.{set}.0.{i}:8080")).collect();
            let before = build(&backends(&n, &[1; 10]));
            for removed in 0..10 {
                let mut weights = [1; 10];
                weights[removed] = 0;
                let after = build(&backends(&n, &weights));
                assert_eq!(before.len(), after.len());
                let m = before.len() as f64;
                let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64;
                assert!(changed / m <= 0.1 + 0.1, "{changed} of {m} entries moved");
                // Entries of the remaining backends mostly stay where they were.
                let kept_moved = before
                    .iter()
                    .zip(&after)
                    .filter(|(&a, &b)| a as usize != removed && a != b)
                    .count() as f64;
                let kept_total = before.iter().filter(|&&a| a as usize != removed).count() as f64;
                assert!(
                    kept_moved / kept_total <= 0.1,
                    "{kept_moved} of {kept_total} entries of remaining backends moved"
                );
                total += changed / m;
                trials += 1.0;
            }
        }
        assert!(
            total / trials <= 0.17,
            "on average {} moved",
            total / trials
        );
    }

    #[test]
    fn adding_one_moves_about_its_share() {
        let n = names(11);
        let mut weights = [1; 11];
        weights[10] = 0;
        let before = build(&backends(&n, &weights));
        let after = build(&backends(&n, &[1; 11]));
        let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count() as f64;
        assert!(changed / before.len() as f64 <= 1.0 / 11.0 + 0.1);
    }

    #[test]
    fn largest_table_builds() {
        let n = names(MAX_BACKENDS);
        let mut weights = vec![1; MAX_BACKENDS];
        weights[0] = 10_000;
        let table = build(&backends(&n, &weights));
        assert_eq!(table.len(), 65521);
    }
}
