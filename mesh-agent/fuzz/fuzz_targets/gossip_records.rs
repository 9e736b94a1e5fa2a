//! A peer's gossip records (`key<TAB>value` lines): decoded without a panic, and what decodes
//! is an announcement that encodes and decodes back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::gossip::record;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pairs: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('\t')).collect();
    let decoded = record::decode(pairs.iter().copied());
    let encoded = record::encode(&decoded.node, &decoded.announcement);
    let again = record::decode(encoded.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    assert_eq!(again.errors, []);
    assert_eq!(again.announcement, decoded.announcement);
    assert!(again.complete());
});
