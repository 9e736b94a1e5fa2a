//! Gossip traffic of one node: the agent's own counters (`mesh_gossip_bytes_total` and
//! `mesh_gossip_datagrams_total` on its metrics endpoint, counted by the authenticating
//! transport, which sees every datagram) and the node's interface counters, to check the
//! former against what crossed the wire.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::ops::Sub;
use std::time::Duration;

use anyhow::{Context as _, Result};
use mesh_tests::Node;
use serde_json::Value;

/// The agent's metrics endpoint inside its node (the agent's default `--metrics-addr` port).
const METRICS: &str = "127.0.0.1:15020";
/// Ethernet (14), IPv4 (20) and UDP (8) headers: what a datagram of N payload bytes adds on a
/// veth, unfragmented.
pub const FRAME_OVERHEAD: u64 = 42;

/// Bytes and datagrams (or frames), sent and received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sent: u64,
    pub received: u64,
}

impl Counts {
    pub fn bytes(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }

    pub fn datagrams(&self) -> u64 {
        self.sent + self.received
    }
}

impl Sub for Counts {
    type Output = Counts;
    fn sub(self, before: Counts) -> Counts {
        Counts {
            bytes_sent: self.bytes_sent.saturating_sub(before.bytes_sent),
            bytes_received: self.bytes_received.saturating_sub(before.bytes_received),
            sent: self.sent.saturating_sub(before.sent),
            received: self.received.saturating_sub(before.received),
        }
    }
}

/// The gossip counters of the agent on `node`, from its metrics endpoint.
pub fn gossip(node: &Node) -> Result<Counts> {
    let text = node
        .netns()
        .run_in(scrape)?
        .with_context(|| format!("scraping the agent's metrics on {}", node.name()))?;
    gossip_counts(&text)
}

fn scrape() -> Result<String> {
    let addr: SocketAddr = METRICS.parse()?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

fn gossip_counts(text: &str) -> Result<Counts> {
    let value = |name: &str, direction: &str| -> Result<u64> {
        let key = format!("{name}{{direction=\"{direction}\"}}");
        text.lines()
            .find_map(|l| l.strip_prefix(&key)?.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .with_context(|| format!("no metric {key} in the agent's metrics"))
    };
    Ok(Counts {
        bytes_sent: value("mesh_gossip_bytes_total", "sent")?,
        bytes_received: value("mesh_gossip_bytes_total", "received")?,
        sent: value("mesh_gossip_datagrams_total", "sent")?,
        received: value("mesh_gossip_datagrams_total", "received")?,
    })
}

/// Bytes and frames through `node`'s `eth0` (its only link), from `ip -s -j link`.
pub fn interface(node: &Node) -> Result<Counts> {
    let json = node
        .netns()
        .ip(&["-s", "-j", "link", "show", "dev", "eth0"])?;
    interface_counts(&json).with_context(|| format!("eth0 counters of {}", node.name()))
}

fn interface_counts(json: &str) -> Result<Counts> {
    let v: Value = serde_json::from_str(json).context("`ip -j` printed non-JSON")?;
    let stats = &v[0]["stats64"];
    let n = |dir: &str, what: &str| {
        stats[dir][what]
            .as_u64()
            .with_context(|| format!("no stats64.{dir}.{what} in {json}"))
    };
    Ok(Counts {
        bytes_sent: n("tx", "bytes")?,
        bytes_received: n("rx", "bytes")?,
        sent: n("tx", "packets")?,
        received: n("rx", "packets")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_agents_gossip_counters() {
        let text = "# TYPE mesh_gossip_bytes counter\n\
            mesh_gossip_bytes_total{direction=\"sent\"} 1200\n\
            mesh_gossip_bytes_total{direction=\"received\"} 1500\n\
            mesh_gossip_datagrams_total{direction=\"sent\"} 10\n\
            mesh_gossip_datagrams_total{direction=\"received\"} 12\n";
        let c = gossip_counts(text).unwrap();
        assert_eq!((c.bytes(), c.datagrams()), (2700, 22));
        let e = gossip_counts("mesh_gossip_bytes_total{direction=\"sent\"} 1\n").unwrap_err();
        assert!(
            format!("{e}").contains("bytes_total{direction=\"received\"}"),
            "{e}"
        );
    }

    #[test]
    fn reads_interface_counters_and_subtracts() {
        let json = r#"[{"ifname":"eth0","stats64":{"rx":{"bytes":500,"packets":5},"tx":{"bytes":900,"packets":7}}}]"#;
        let after = interface_counts(json).unwrap();
        assert_eq!(after.bytes(), 1400);
        let before = Counts {
            bytes_sent: 100,
            bytes_received: 100,
            sent: 1,
            received: 1,
        };
        assert_eq!((after - before).datagrams(), 10);
        assert!(interface_counts("[{}]").is_err());
    }
}
