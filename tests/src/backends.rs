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
    /// One per node; `None` while stopped ([`Backends::stop`]).
    servers: Vec<Option<Proc>>,
    protocol: Protocol,
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
            servers.push(Some(serve(&node, protocol, addr)?));
            nodes.push((node, addr));
        }
        Ok(Self {
            servers,
            protocol,
            nodes,
        })
    }

    /// Kills the server on node `name` (its port then refuses connections).
    pub fn stop(&mut self, name: &str) -> Result<()> {
        let i = self.index_of(name)?;
        self.servers[i] = None;
        Ok(())
    }

    /// Starts the server on node `name` again, on the same address.
    pub fn start_again(&mut self, name: &str) -> Result<()> {
        let i = self.index_of(name)?;
        let (node, addr) = &self.nodes[i];
        self.servers[i] = Some(serve(node, self.protocol, *addr)?);
        Ok(())
    }

    fn index_of(&self, name: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|(node, _)| node.name() == name)
            .with_context(|| format!("no backend named {name}"))
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

    /// The node named `name`.
    pub fn node(&self, name: &str) -> Result<&Node> {
        Ok(&self.nodes[self.index_of(name)?].0)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// The server of `node` on `addr`, named after the node.
fn serve(node: &Node, protocol: Protocol, addr: SocketAddr) -> Result<Proc> {
    match protocol {
        Protocol::Tcp => node.tcp_server("server", addr, node.name()),
        Protocol::Udp => node.udp_server("server", addr, node.name()),
    }
}
