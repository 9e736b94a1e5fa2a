//! Gossip datagrams as they arrive from the network: any bytes are refused or opened without
//! a panic; a frame sealed around any message opens to that message once, and is refused as a
//! replay the second time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::gossip::auth::{MeshKey, Rejected, ReplayGuard, Stamp};

const NOW_MS: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let key = MeshKey::new(&[7; 32]).expect("a long enough key");
    let mut seen = ReplayGuard::default();
    let _ = key.open(data, &mut seen, NOW_MS);
    let sealed = key.seal(data, Stamp { sent_ms: NOW_MS, nonce: 1 });
    assert_eq!(key.open(&sealed, &mut seen, NOW_MS), Ok(data));
    assert_eq!(key.open(&sealed, &mut seen, NOW_MS), Err(Rejected::Replayed));
});
