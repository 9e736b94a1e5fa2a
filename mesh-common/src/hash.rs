//! The client hash that indexes a Maglev table.
//!
//! Kernel and agent must compute the same value: the kernel to pick a slot, the agent's tests to
//! predict which backend a client lands on. SplitMix64's finaliser mixes every input bit into the
//! output with a few multiplies, which the verifier accepts without loops.

/// Hash a client key (cgroup id, netns cookie or socket cookie) for service `service_id`.
///
/// Salting with the service id keeps one client's choices independent across services.
pub const fn client_hash(client: u64, service_id: u32) -> u32 {
    let mut z = client ^ ((service_id as u64) << 32 | service_id as u64);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z ^ (z >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::client_hash;

    #[test]
    fn same_client_same_hash_and_services_are_independent() {
        assert_eq!(client_hash(42, 7), client_hash(42, 7));
        assert_ne!(client_hash(42, 7), client_hash(42, 8));
        assert_ne!(client_hash(42, 7), client_hash(43, 7));
    }

    #[test]
    fn consecutive_clients_spread_evenly_over_slots() {
        // Cgroup ids and cookies are mostly consecutive numbers: they must not cluster.
        let mut buckets = [0u32; 10];
        for client in 0..10_000u64 {
            buckets[(client_hash(client, 1) % 10) as usize] += 1;
        }
        for count in buckets {
            assert!((900..=1100).contains(&count), "uneven spread: {buckets:?}");
        }
    }
}
