//! A peer's HTTP/2 CONNECT request as the inbound tunnel sees it (method, authority and
//! headers, one per line): parsed or refused without a panic, and a parsed target is a real
//! address.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::tunnel::proxy::connect;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.lines();
    let (Some(method), Some(uri)) = (lines.next(), lines.next()) else {
        return;
    };
    let mut builder = http::Request::builder().method(method).uri(uri);
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            builder = builder.header(name.trim(), value.trim());
        }
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let _ = connect::is_probe(&request);
    if let Ok(target) = connect::parse(&request) {
        assert_ne!(target.backend.port(), 0);
    }
});
