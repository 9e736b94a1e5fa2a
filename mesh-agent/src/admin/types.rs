//! The answers of the admin API: the status, service, endpoint and node reports, as the agent
//! serves them (JSON) and the CLI reads them back.
//!
//! One shape per field: a field named `vip` is an IP address (its port is `port`), a
//! `frontend`, `address` or `backend` is `IP:port` (IPv6 in brackets); what is unknown or absent
//! is `null`, never an empty string, and every field is always present.
//!
//! A report is built from two sources: the desired state (names, weights, as configured) and
//! the kernel (slot counts actually installed, counters). Showing both lets an operator see a
//! service whose kernel state lags or failed to apply.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{catalog::Conflict, model::policy::Rule};

/// The whole status of one agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    /// Why the agent is degraded, one reason each (a rejected config change, a service in
    /// panic or with no backend, unhealthy backends, catalog conflicts); empty: all is well.
    #[serde(default)]
    pub degraded: Vec<String>,
    pub node: String,
    /// Config file the agent follows.
    pub config: String,
    /// The cgroup the programs are attached to.
    pub cgroup: String,
    /// True when this agent adopted maps pinned by an earlier run.
    pub adopted: bool,
    /// The last rejected config change, if the newest file is not the one in force.
    pub config_error: Option<String>,
    pub services: Vec<ServiceStatus>,
    /// Kernel counters by reason, summed over CPUs.
    pub counters: BTreeMap<String, u64>,
    /// Disagreements between the nodes' announcements, and how each was resolved.
    #[serde(default)]
    pub conflicts: Vec<Conflict>,
}

/// One service, as configured and as installed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub lb: String,
    /// `none`, `cgroup` or `netns`.
    pub affinity: String,
    pub backends: Vec<BackendStatus>,
    /// Slots in the kernel's active table (0: connects are refused).
    pub slots: u32,
    /// Backends with weight that health leaves in the table (not unhealthy, not ejected).
    #[serde(default)]
    pub healthy: u32,
    /// Every backend with weight is unhealthy, so all of them are used.
    #[serde(default)]
    pub panic: bool,
}

/// One backend of a service.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
}

/// One backend with what the kernel knows of it (`mesh-agent endpoints`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EndpointStatus {
    pub service: String,
    pub address: String,
    pub weight: u32,
    /// `active` (in the kernel's table), `drained` (weight 0), `excluded` (left out of the
    /// table by health or locality) or `pending` (configured, not installed: the last apply
    /// failed).
    pub state: String,
    /// Connections and UDP datagrams the kernel sent to it since it was added.
    pub connections: u64,
    /// The nodes announcing it (this one from its config or a registration, peers by gossip;
    /// any member holding the mesh key may announce endpoints of any service).
    pub announced_by: Vec<String>,
    /// `healthy`, `unhealthy` (active check) or `ejected` (failed connects); `null` when
    /// the service has no health checking.
    #[serde(default)]
    pub health: Option<String>,
    /// Why it is unhealthy or ejected.
    #[serde(default)]
    pub health_reason: Option<String>,
    /// When an ejection ends (RFC 3339).
    #[serde(default)]
    pub ejected_until: Option<String>,
}

/// A node of the mesh as this agent sees it (`mesh-agent nodes`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct NodeStatus {
    pub name: String,
    /// `self` for this agent's node.
    pub role: String,
    /// The cgroup its programs are attached to (`null` for peers: gossip does not say).
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Its agent's version, commit included; `null` for a peer restored from the state file
    /// that gossip has not delivered yet.
    #[serde(default)]
    pub version: Option<String>,
    /// Seconds since this agent started.
    pub uptime_s: u64,
    /// Its gossip address (`null` without gossip).
    #[serde(default)]
    pub address: Option<String>,
    /// `alive` or `dead`, as the failure detector sees it.
    #[serde(default)]
    pub state: String,
    /// The endpoints it announces, as `service=address`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Its records that were left out, and why.
    #[serde(default)]
    pub rejected: Vec<String>,
}

/// One authorization rule as `mesh-agent policies` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PolicyStatus {
    pub service: String,
    pub port: Option<u16>,
    /// `allow` or `deny`.
    pub action: String,
    pub from: Vec<String>,
}

impl From<&Rule> for PolicyStatus {
    fn from(rule: &Rule) -> Self {
        PolicyStatus {
            service: rule.service.clone(),
            port: rule.port,
            action: rule.action.to_string(),
            from: rule.from.iter().map(ToString::to_string).collect(),
        }
    }
}
