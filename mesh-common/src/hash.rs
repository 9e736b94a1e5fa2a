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
