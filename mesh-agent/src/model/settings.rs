//! Plain settings the runtime rooms are given (health probing, outlier detection, locality,
//! gossip, the tunnel), made by `config` from the file: a runtime room never reads the config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::identity::SpiffeId;

/// Passive detection defaults (Envoy's outlier detection uses the same three).
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_BASE_EJECTION_MS: u64 = 30_000;
pub const DEFAULT_MAX_EJECTION_MS: u64 = 300_000;
/// The share of a service's backends outlier detection may eject at once, by default.
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;

/// Everything a service says about the health of its backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSettings {
    /// The active check, if the service has one.
    pub check: Option<ActiveCheck>,
    /// Passive outlier detection from the kernel's connect outcomes.
    pub outlier: Option<OutlierSettings>,
    pub locality: Locality,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            check: None,
            outlier: Some(OutlierSettings::default()),
            locality: Locality::Any,
        }
    }
}

/// A probe of every backend every `interval`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ActiveCheck {
    pub interval: Duration,
    /// Less than `interval`.
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub unhealthy_threshold: u32,
    /// An HTTP/1.1 GET after the connect; `None`: the TCP connect is the check.
    pub http: Option<HttpCheck>,
}

/// The path to GET and the status to expect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HttpCheck {
    /// Starts with `/`; printable ASCII without spaces.
    pub path: String,
    pub expect_status: u16,
}

/// Ejection after `consecutive_failures` failed connects in a row, for `base_ejection × 2^k`
/// (k: ejections in a row), at most `max_ejection`; never more than `max_ejection_percent` of
/// a service's backends at once (at least one may always be ejected, as in Envoy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierSettings {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    /// At least `base_ejection`.
    pub max_ejection: Duration,
    /// 1..=100.
    pub max_ejection_percent: u32,
}

impl OutlierSettings {
    /// How many of `backends` may be ejected at once.
    pub fn ejection_cap(&self, backends: usize) -> usize {
        (backends * self.max_ejection_percent as usize / 100).max(1)
    }
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: Duration::from_millis(DEFAULT_BASE_EJECTION_MS),
            max_ejection: Duration::from_millis(DEFAULT_MAX_EJECTION_MS),
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

/// Which healthy backends a service uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locality {
    /// Every healthy backend alike.
    #[default]
    Any,
    /// Only the healthy backends on this node (their address is one of the node's) while there
    /// is one; all healthy backends otherwise.
    PreferLocal,
}

/// How the agent gossips with its peers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GossipSettings {
    /// Where the gossip socket binds.
    pub listen: SocketAddr,
    /// The address peers use to reach this node (a unicast address, never 0.0.0.0).
    pub advertise: SocketAddr,
    /// Peers to join through.
    pub seeds: Vec<SocketAddr>,
    /// The mesh key's file (absolute).
    pub key_file: PathBuf,
    /// Peers must use the same cluster name.
    pub cluster: String,
    /// Gossip round period.
    pub interval: Duration,
    /// The phi-accrual failure detector's threshold.
    pub phi_threshold: u32,
}

/// The `[mtls]` settings the tunnel is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsSettings {
    pub trust_domain: String,
    pub ca_bundle: PathBuf,
    /// The node's certificate and key (its SPIFFE ID is read from the certificate).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Services that say nothing are strict (`[mtls] default = "strict"`).
    pub strict_by_default: bool,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// How long a pooled tunnel connection lives unused.
    pub idle_timeout: Duration,
    /// Threads of the data-plane runtime that runs the tunnel's listeners and relays.
    pub workers: u32,
    /// Whether the loopback hop between applications and the outbound listener skips TCP
    /// through a sockmap (`sk_msg` redirect); off by default: it helps small request/response
    /// messages a little, costs bulk throughput, and the kernel's redirect has no backpressure
    /// (a sender outrunning the agent gets `ENOMEM`). See ARCHITECTURE.md.
    pub loopback_sockmap: bool,
    pub identities: Vec<IdentitySettings>,
}

/// A workload identity: the cgroup whose processes have it, and its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySettings {
    /// Absolute, or relative to the cgroup2 root.
    pub cgroup: PathBuf,
    pub spiffe_id: SpiffeId,
    pub cert: PathBuf,
    pub key: PathBuf,
}
