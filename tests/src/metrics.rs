//! Reading an agent's Prometheus metrics from inside its node: one scrape of the default
//! endpoint (`127.0.0.1:15020/metrics` in the node's namespace) or one of its probes, one
//! series' value, and polling until a series reaches a value.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::bed::Node;

/// The agent's default metrics address, inside its node.
const ENDPOINT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
const TIMEOUT: Duration = Duration::from_secs(5);

/// The whole HTTP response of one `GET /metrics` to `node`'s agent.
pub fn scrape(node: &Node) -> Result<String> {
    get(node, "/metrics")
}

/// The whole HTTP response of one `GET path` to the metrics port of `node`'s agent (also
/// `/healthz` and `/ready`).
pub fn get(node: &Node, path: &str) -> Result<String> {
    node.netns().run_in(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&ENDPOINT, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })?
}

/// The value of the line that starts with `series` (name and labels exactly as exported).
pub fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Polls `node`'s metrics (every 50 ms, up to `timeout`) until `series` is at least `want`.
pub fn wait_at_least(node: &Node, series: &str, want: f64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = scrape(node)?;
        if value(&text, series).is_some_and(|v| v >= want) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{series} on {} never reached {want} within {timeout:?}; metrics:\n{text}",
                node.name()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
