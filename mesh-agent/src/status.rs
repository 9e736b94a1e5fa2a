//! What `mesh-agent status` shows: the report the admin API serves and its table rendering.
//!
//! The report is built from two sources: the desired state (names, weights, as configured) and
//! the kernel (slot counts actually installed, counters). Showing both lets an operator see a
//! service whose kernel state lags or failed to apply.

use std::{collections::BTreeMap, fmt::Write as _};

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};
use mesh_common::service::{SERVICE_FLAG_AFFINITY_CGROUP, SERVICE_FLAG_AFFINITY_NETNS};
use serde::{Deserialize, Serialize};

use crate::{catalog::Conflict, desired::Desired, reconcile::KernelState};

/// The whole status of one agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
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
    /// `healthy`, `unhealthy` (active check) or `ejected` (failed connects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Why it is unhealthy or ejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_reason: Option<String>,
    /// When an ejection ends (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejected_until: Option<String>,
}

/// A node of the mesh as this agent sees it (`mesh-agent nodes`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct NodeStatus {
    pub name: String,
    /// `self` for this agent's node.
    pub role: String,
    pub cgroup: String,
    pub version: String,
    /// Seconds since this agent started.
    pub uptime_s: u64,
    /// Its gossip address (empty without gossip).
    #[serde(default)]
    pub address: String,
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

impl StatusReport {
    /// Human-readable tables.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "node {}  cgroup {}  config {}{}",
            self.node,
            self.cgroup,
            self.config,
            if self.adopted {
                "  (adopted pinned state)"
            } else {
                ""
            }
        );
        if let Some(error) = &self.config_error {
            let _ = writeln!(
                out,
                "config change rejected, previous config in force: {error}"
            );
        }
        for conflict in &self.conflicts {
            let _ = writeln!(out, "catalog conflict: {conflict}");
        }
        let services = self.services.iter().map(|service| {
            let backends = if service.backends.is_empty() {
                "(none: connects refused)".to_owned()
            } else {
                service
                    .backends
                    .iter()
                    .map(|b| format!("{} w={}", b.address, b.weight))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            [
                service_name(service),
                frontend(&service.vip, service.port),
                service.protocol.clone(),
                service.lb.clone(),
                service.affinity.clone(),
                service.slots.to_string(),
                backends,
            ]
        });
        out.push_str(&table(
            [
                "SERVICE", "FRONTEND", "PROTO", "LB", "AFFINITY", "SLOTS", "BACKENDS",
            ],
            services,
        ));
        out.push_str(&table(
            ["COUNTER", "VALUE"],
            self.counters
                .iter()
                .map(|(name, value)| [name.clone(), value.to_string()]),
        ));
        out
    }
}

/// `10.0.0.1:80` or `[fd00::1]:80`.
fn frontend(vip: &str, port: u16) -> String {
    if vip.contains(':') {
        format!("[{vip}]:{port}")
    } else {
        format!("{vip}:{port}")
    }
}

/// Each desired service with the slot count the kernel actually holds for it.
pub fn services(desired: &Desired, kernel: &KernelState) -> Vec<ServiceStatus> {
    desired
        .services
        .iter()
        .map(|(key, service)| ServiceStatus {
            name: service.name.clone(),
            vip: service.vip.to_string(),
            port: service.port,
            protocol: service.protocol.to_string(),
            lb: service.policy.to_string(),
            affinity: affinity_name(service.flags).to_owned(),
            backends: service
                .backends
                .iter()
                .map(|b| BackendStatus {
                    address: b.addr.to_string(),
                    weight: b.weight,
                })
                .collect(),
            slots: kernel.services.get(key).map_or(0, |s| s.count),
            panic: false,
        })
        .collect()
}

/// The name, marked when the service is in panic.
fn service_name(service: &ServiceStatus) -> String {
    if service.panic {
        format!(
            "{}\n(panic: all backends unhealthy, all used)",
            service.name
        )
    } else {
        service.name.clone()
    }
}

fn affinity_name(flags: u32) -> &'static str {
    if flags & SERVICE_FLAG_AFFINITY_NETNS != 0 {
        "netns"
    } else if flags & SERVICE_FLAG_AFFINITY_CGROUP != 0 {
        "cgroup"
    } else {
        "none"
    }
}

/// A table with a header row, in the style of the status tables.
pub fn table<const N: usize>(
    header: [&str; N],
    rows: impl IntoIterator<Item = [String; N]>,
) -> String {
    let mut table = Table::new();
    table.load_preset(UTF8_BORDERS_ONLY).set_header(header);
    for row in rows {
        table.add_row(row);
    }
    format!("{table}\n")
}

/// `mesh-agent services`.
pub fn render_services(services: &[ServiceStatus]) -> String {
    table(
        [
            "SERVICE", "FRONTEND", "PROTO", "LB", "AFFINITY", "SLOTS", "BACKENDS",
        ],
        services.iter().map(|s| {
            [
                service_name(s),
                frontend(&s.vip, s.port),
                s.protocol.clone(),
                s.lb.clone(),
                s.affinity.clone(),
                s.slots.to_string(),
                s.backends.len().to_string(),
            ]
        }),
    )
}

/// `mesh-agent endpoints`.
pub fn render_endpoints(endpoints: &[EndpointStatus]) -> String {
    table(
        [
            "SERVICE",
            "ENDPOINT",
            "WEIGHT",
            "STATE",
            "HEALTH",
            "CONNECTIONS",
            "NODE",
        ],
        endpoints.iter().map(|e| {
            let mut health = e.health.clone().unwrap_or_else(|| "-".into());
            if let Some(reason) = &e.health_reason {
                health.push_str(&format!(": {reason}"));
            }
            if let Some(until) = &e.ejected_until {
                health.push_str(&format!(" (until {until})"));
            }
            [
                e.service.clone(),
                e.address.clone(),
                e.weight.to_string(),
                e.state.clone(),
                health,
                e.connections.to_string(),
                e.announced_by.join(","),
            ]
        }),
    )
}

/// `mesh-agent nodes`.
pub fn render_nodes(nodes: &[NodeStatus]) -> String {
    table(
        [
            "NODE",
            "ROLE",
            "ADDRESS",
            "STATE",
            "VERSION",
            "UPTIME",
            "ENDPOINTS",
        ],
        nodes.iter().map(|n| {
            [
                n.name.clone(),
                n.role.clone(),
                n.address.clone(),
                n.state.clone(),
                n.version.clone(),
                format!("{}s", n.uptime_s),
                n.endpoints.join("\n"),
            ]
        }),
    )
}

/// `mesh-agent policies` as a table.
pub fn render_policies(policies: &[crate::mtls::policy::PolicyStatus]) -> String {
    if policies.is_empty() {
        return "no authorization policies (every authenticated caller may reach mTLS services)\n"
            .into();
    }
    table(
        ["SERVICE", "PORT", "ACTION", "FROM"],
        policies.iter().map(|p| {
            [
                p.service.clone(),
                p.port
                    .map_or_else(|| "*".to_owned(), |port| port.to_string()),
                p.action.to_string(),
                p.from.join("\n"),
            ]
        }),
    )
}

/// `mesh-agent certs` as a table.
pub fn render_certs(certs: &[crate::mtls::certs::CertStatus]) -> String {
    if certs.is_empty() {
        return "no certificates (mTLS is off: no [mtls] section)\n".into();
    }
    table(
        ["IDENTITY", "SERIAL", "NOT AFTER", "DAYS LEFT", "FILE"],
        certs.iter().map(|c| {
            [
                c.identity.clone(),
                c.serial.clone(),
                c.not_after.clone(),
                c.days_left.to_string(),
                c.file.clone(),
            ]
        }),
    )
}
