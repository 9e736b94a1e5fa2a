//! The registrations file read back at start: refused as a whole with an error naming the
//! file, or every endpoint read is one `register` would accept.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use mesh_agent::catalog::registry::Registry;

fuzz_target!(|data: &[u8]| {
    match Registry::parse(Path::new("registrations.json"), data) {
        Ok(registrations) => {
            for endpoint in registrations.endpoints() {
                assert!(endpoint.check().is_ok(), "{endpoint:?}");
            }
        }
        Err(error) => assert!(error.to_string().starts_with("registrations.json")),
    }
});
