//! The CLI's tables: how `status`, `services`, `endpoints`, `nodes`, `policies` and `certs`
//! show the admin API's answers to people.

use std::fmt::Write as _;

use comfy_table::{presets::UTF8_BORDERS_ONLY, Table};

use crate::admin::types::{EndpointStatus, NodeStatus, ServiceStatus, StatusReport};

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
pub fn render_policies(policies: &[crate::tunnel::authz::policy::PolicyStatus]) -> String {
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
pub fn render_certs(certs: &[crate::tunnel::identity::certs::CertStatus]) -> String {
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
