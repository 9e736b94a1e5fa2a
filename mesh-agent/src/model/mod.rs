//! The one service vocabulary of the agent: what a service, its frontend and its backends are,
//! the policies and settings they carry, the limits they must fit and the rules that say
//! whether a value is usable.
//!
//! Every other room speaks these types: `config` turns TOML into them, `catalog` merges them,
//! `balance` turns them into the desired kernel state, `gossip` converts them to and from its
//! own wire types, and the runtime rooms receive the plain settings structs of
//! [`settings`] rather than the config. The rules live here once ([`rules`]), with typed
//! errors whose texts the config's `file:line: field: cause` errors and the catalog's refusals
//! both show.
//!
//! This room imports nothing else of the crate (std only; `cargo xtask lint` checks it): no
//! serde, so renaming a type here can change neither the config's keys nor the gossip wire.

pub mod identity;
pub mod limits;
pub mod policy;
pub mod rules;
pub mod settings;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

pub use settings::{ActiveCheck, HealthSettings, HttpCheck, Locality, OutlierSettings};

/// The transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// How a service picks a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LbPolicy {
    /// Every backend with nonzero weight equally likely, whatever its weight.
    #[default]
    Random,
    /// Random, in proportion to weight.
    Weighted,
    /// Consistent hashing of the client (or socket) onto a Maglev table, weighted.
    Maglev,
}

impl fmt::Display for LbPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LbPolicy::Random => "random",
            LbPolicy::Weighted => "weighted",
            LbPolicy::Maglev => "maglev",
        })
    }
}

/// Which client keeps its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Affinity {
    /// Every connect picks anew.
    #[default]
    None,
    /// Each cgroup keeps its backend.
    Cgroup,
    /// Each network namespace keeps its backend.
    Netns,
}

impl fmt::Display for Affinity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Affinity::None => "none",
            Affinity::Cgroup => "cgroup",
            Affinity::Netns => "netns",
        })
    }
}

/// What clients connect to: (VIP, port, protocol), unique among services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    /// `10.96.0.10:80/tcp`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            SocketAddr::new(self.vip, self.port),
            self.protocol
        )
    }
}

/// One backend of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    /// 0..=[`limits::MAX_WEIGHT`]; 0 means drained: listed, never picked.
    pub weight: u32,
}

/// A service: its name, frontend, policy, backends and settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// A DNS label ([`rules::service_name`]).
    pub name: String,
    /// The virtual address clients connect to.
    pub vip: IpAddr,
    /// 1..=65535.
    pub port: u16,
    pub protocol: Protocol,
    pub lb: LbPolicy,
    pub affinity: Affinity,
    /// 1..=[`limits::MAX_AFFINITY_TIMEOUT_S`]; kept even when `affinity` is off.
    pub affinity_timeout_s: u32,
    /// Each address once, all of the VIP's family. May be empty.
    pub backends: Vec<Backend>,
    /// Active check, outlier detection and locality: each agent's own (not gossiped).
    pub health: HealthSettings,
    /// Strict mTLS: clients' connections go through the agents' tunnel (TCP only).
    pub mtls: bool,
}

impl Service {
    /// The (VIP, port, protocol) of this service.
    pub fn frontend(&self) -> Frontend {
        Frontend {
            vip: self.vip,
            port: self.port,
            protocol: self.protocol,
        }
    }
}
