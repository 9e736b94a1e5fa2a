//! Rendering `mesh-agent` config files for tests.
//!
//! Tests describe services with [`Service`] and get the TOML text the agent reads. Each backend
//! is written on its own line, so a test can point at the line of one backend
//! ([`line_of`]) when it checks that an error names the file and line. Addresses are kept as
//! strings so a test can write an invalid one on purpose.

use std::fmt::Write;
use std::net::SocketAddr;

/// One backend: its address as written in the file, and an optional weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub address: String,
    pub weight: Option<u32>,
}

impl Backend {
    /// A backend with no weight given.
    pub fn new(address: impl ToString) -> Self {
        Self {
            address: address.to_string(),
            weight: None,
        }
    }

    /// A backend with `weight`.
    pub fn weighted(address: impl ToString, weight: u32) -> Self {
        Self {
            address: address.to_string(),
            weight: Some(weight),
        }
    }
}

/// One `[[services]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    pub vip: String,
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `random`, `weighted` or `maglev`.
    pub lb: String,
    /// A TOML value: `false`, `true`, `"cgroup"` or `"netns"` (quotes included).
    pub affinity: String,
    pub backends: Vec<Backend>,
    /// More `key = value` lines, written as given (`health = { … }`, …).
    pub extra: Vec<String>,
}

impl Service {
    /// A TCP service on `vip` (address and port), random balancing, no affinity.
    pub fn tcp(name: &str, vip: SocketAddr, backends: &[SocketAddr]) -> Self {
        Self {
            name: name.to_string(),
            vip: vip.ip().to_string(),
            port: vip.port(),
            protocol: "tcp".into(),
            lb: "random".into(),
            affinity: "false".into(),
            backends: backends.iter().map(Backend::new).collect(),
            extra: Vec::new(),
        }
    }

    /// A UDP service, otherwise like [`Service::tcp`].
    pub fn udp(name: &str, vip: SocketAddr, backends: &[SocketAddr]) -> Self {
        Self {
            protocol: "udp".into(),
            ..Self::tcp(name, vip, backends)
        }
    }

    /// Sets the balancing algorithm.
    pub fn lb(mut self, lb: &str) -> Self {
        self.lb = lb.into();
        self
    }

    /// Sets affinity to a TOML value (`true`, `"netns"`, …).
    pub fn affinity(mut self, toml_value: &str) -> Self {
        self.affinity = toml_value.into();
        self
    }

    /// Adds a `key = value` line to the service (`health = { interval_ms = 500 }`).
    pub fn with(mut self, toml_line: &str) -> Self {
        self.extra.push(toml_line.into());
        self
    }

    /// Replaces the backends.
    pub fn backends(mut self, backends: Vec<Backend>) -> Self {
        self.backends = backends;
        self
    }
}

/// The config file text for node `node` with `services`.
pub fn render(node: &str, services: &[Service]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "[node]\nname = {node:?}");
    for svc in services {
        let _ = write!(
            s,
            "\n[[services]]\nname = {:?}\nvip = {:?}\nport = {}\nprotocol = {:?}\nlb = {:?}\naffinity = {}",
            svc.name, svc.vip, svc.port, svc.protocol, svc.lb, svc.affinity
        );
        for line in &svc.extra {
            let _ = write!(s, "\n{line}");
        }
        s.push_str("\nbackends = [");
        for b in &svc.backends {
            let _ = write!(s, "\n  {{ address = {:?}", b.address);
            if let Some(w) = b.weight {
                let _ = write!(s, ", weight = {w}");
            }
            s.push_str(" },");
        }
        if !svc.backends.is_empty() {
            s.push('\n');
        }
        s.push_str("]\n");
    }
    s
}

/// A `[gossip]` table: `advertise` on the gossip port, joining through `seeds`, under the mesh
/// key in `key_file`; `extra` lines (`interval = "100ms"`) follow.
pub fn gossip_table(
    advertise: std::net::IpAddr,
    seeds: &[std::net::IpAddr],
    key_file: &std::path::Path,
    extra: &[String],
) -> String {
    let seeds: Vec<String> = seeds
        .iter()
        .map(|s| format!("\"{}\"", SocketAddr::new(*s, GOSSIP_PORT)))
        .collect();
    let mut s = format!(
        "\n[gossip]\nadvertise = \"{}\"\nseeds = [{}]\nkey_file = {:?}\n",
        SocketAddr::new(advertise, GOSSIP_PORT),
        seeds.join(", "),
        key_file.display().to_string()
    );
    for line in extra {
        let _ = writeln!(s, "{line}");
    }
    s
}

/// The gossip port of every agent of a test mesh.
pub const GOSSIP_PORT: u16 = 15010;

/// The 1-based number of the first line of `text` containing `needle`.
pub fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_backend_per_line() {
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let b: SocketAddr = "10.1.0.2:8080".parse().unwrap();
        let svc = Service::tcp("web", vip, &[b]).lb("weighted").backends(vec![
            Backend::weighted(b, 3),
            Backend::new("[fd00:1::3]:8080"),
        ]);
        let text = render("n", &[svc, Service::udp("dns", vip, &[])]);
        assert_eq!(
            text,
            r#"[node]
name = "n"

[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
protocol = "tcp"
lb = "weighted"
affinity = false
backends = [
  { address = "10.1.0.2:8080", weight = 3 },
  { address = "[fd00:1::3]:8080" },
]

[[services]]
name = "dns"
vip = "10.96.0.10"
port = 80
protocol = "udp"
lb = "random"
affinity = false
backends = []
"#
        );
        assert_eq!(line_of(&text, "[fd00:1::3]"), Some(13));
    }
}
