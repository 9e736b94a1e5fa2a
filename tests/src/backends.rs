//! Named backend servers, one per node: the usual shape of a scenario. Each server is named
//! after its node, so a client's report says which backend it reached.

use std::net::SocketAddr;

use anyhow::{Context, Result};

use crate::{Node, Proc, TestBed};

/// What the backend servers speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// Backend nodes with their servers; the servers stop when this is dropped.
pub struct Backends {
    // Fields drop in order: the servers before the nodes.
    _servers: Vec<Proc>,
    /// (node, the address its server listens on), in the order the names were given.
    nodes: Vec<(Node, SocketAddr)>,
}

impl Backends {
    /// Adds one node per name to `bed`, each running a `protocol` server named after the node
    /// on `port` at its IPv4 (or, with `ipv6`, IPv6) address.
    pub fn start(
        bed: &TestBed,
        names: &[&str],
        protocol: Protocol,
        ipv6: bool,
        port: u16,
    ) -> Result<Self> {
        let mut servers = Vec::new();
        let mut nodes = Vec::new();
        for name in names {
            let node = bed.add_node(name)?;
            let ip = if ipv6 {
                node.ipv6().into()
            } else {
                node.ipv4().into()
            };
            let addr = SocketAddr::new(ip, port);
            servers.push(match protocol {
                Protocol::Tcp => node.tcp_server("server", addr, name)?,
                Protocol::Udp => node.udp_server("server", addr, name)?,
            });
            nodes.push((node, addr));
        }
        Ok(Self {
            _servers: servers,
            nodes,
        })
    }

    /// Every server's address, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|(_, addr)| *addr).collect()
    }

    /// (backend name, address) pairs, in order.
    pub fn named(&self) -> impl Iterator<Item = (&str, SocketAddr)> {
        self.nodes.iter().map(|(node, addr)| (node.name(), *addr))
    }

    /// The address of the server on node `name`.
    pub fn addr_of(&self, name: &str) -> Result<SocketAddr> {
        self.named()
            .find(|(n, _)| *n == name)
            .map(|(_, addr)| addr)
            .with_context(|| format!("no backend named {name}"))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}
