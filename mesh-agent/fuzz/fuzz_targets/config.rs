//! A config file: parsed and validated, or refused with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, "fuzz.toml");
    }
});
