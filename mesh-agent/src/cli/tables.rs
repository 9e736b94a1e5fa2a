//! The CLI's tables: how `status`, `services`, `endpoints`, `nodes`, `policies` and `certs`
//! show the admin API's answers to people, all through the one renderer ([`super::render`]).

use std::fmt::Write as _;

use super::render::{age, col, table, wide, Column};
use crate::{
    admin::types::{EndpointStatus, NodeStatus, PolicyStatus, ServiceStatus, StatusReport},
    tunnel::identity::certs::CertStatus,
};

const SERVICE_COLUMNS: [Column; 9] = [
    col("SERVICE"),
    col("FRONTEND"),
    col("PROTO"),
    col("LB"),
    col("BACKENDS"),
    col("HEALTHY"),
    col("SLOTS"),
    wide("AFFINITY"),
    wide("ADDRESSES"),
];

impl StatusReport {
    /// The verdict line, what the agent serves, then the services and the kernel counters.
    pub fn render(&self, wide: bool) -> String {
        let mut out = String::new();
        let _ = match self.degraded.is_empty() {
            true => writeln!(out, "ok"),
            false => writeln!(out, "degraded: {}", self.degraded.join("; ")),
        };
        let _ = writeln!(
            out,
            "node {}   cgroup {}   config {}{}",
            self.node,
            self.cgroup,
            self.config,
            if self.adopted {
                "   (adopted pinned state)"
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
        out.push('\n');
        out.push_str(&render_services(&self.services, wide));
        out.push('\n');
        out.push_str(&table(
            &[col("COUNTER"), col("VALUE")],
            self.counters
                .iter()
                .map(|(name, value)| vec![name.clone(), value.to_string()]),
            wide,
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

/// `mesh-agent services` (and the services of `status`).
pub fn render_services(services: &[ServiceStatus], wide: bool) -> String {
    table(
        &SERVICE_COLUMNS,
        services.iter().map(|s| {
            let total = s.backends.iter().filter(|b| b.weight > 0).count();
            let healthy = if s.panic {
                format!("{}/{total} (panic: all used)", s.healthy)
            } else {
                format!("{}/{total}", s.healthy)
            };
            vec![
                s.name.clone(),
                frontend(&s.vip, s.port),
                s.protocol.clone(),
                s.lb.clone(),
                s.backends.len().to_string(),
                healthy,
                s.slots.to_string(),
                s.affinity.clone(),
                s.backends
                    .iter()
                    .map(|b| format!("{}*{}", b.address, b.weight))
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        }),
        wide,
    )
}

/// `mesh-agent endpoints`.
pub fn render_endpoints(endpoints: &[EndpointStatus], wide_columns: bool) -> String {
    table(
        &[
            col("SERVICE"),
            col("ENDPOINT"),
            col("WEIGHT"),
            col("STATE"),
            col("HEALTH"),
            col("CONNECTIONS"),
            col("NODE"),
            wide("REASON"),
            wide("EJECTED UNTIL"),
        ],
        endpoints.iter().map(|e| {
            vec![
                e.service.clone(),
                e.address.clone(),
                e.weight.to_string(),
                e.state.clone(),
                e.health.clone().unwrap_or_else(|| "-".into()),
                e.connections.to_string(),
                e.announced_by.join(","),
                e.health_reason.clone().unwrap_or_default(),
                e.ejected_until.clone().unwrap_or_default(),
            ]
        }),
        wide_columns,
    )
}

/// `mesh-agent nodes`.
pub fn render_nodes(nodes: &[NodeStatus], wide_columns: bool) -> String {
    table(
        &[
            col("NODE"),
            col("ROLE"),
            col("STATE"),
            col("ADDRESS"),
            col("UPTIME"),
            col("ENDPOINTS"),
            wide("VERSION"),
            wide("ANNOUNCED"),
        ],
        nodes.iter().map(|n| {
            vec![
                n.name.clone(),
                n.role.clone(),
                n.state.clone(),
                n.address.clone().unwrap_or_default(),
                if n.role == "self" {
                    age(n.uptime_s)
                } else {
                    String::new()
                },
                n.endpoints.len().to_string(),
                n.version.clone().unwrap_or_default(),
                n.endpoints.join(","),
            ]
        }),
        wide_columns,
    )
}

/// `mesh-agent policies`.
pub fn render_policies(policies: &[PolicyStatus], wide: bool) -> String {
    if policies.is_empty() {
        return "no authorization policies (every authenticated caller may reach mTLS services)\n"
            .into();
    }
    table(
        &[col("SERVICE"), col("PORT"), col("ACTION"), col("FROM")],
        policies.iter().map(|p| {
            vec![
                p.service.clone(),
                p.port
                    .map_or_else(|| "*".to_owned(), |port| port.to_string()),
                p.action.to_string(),
                p.from.join(","),
            ]
        }),
        wide,
    )
}

/// `mesh-agent certs`.
pub fn render_certs(certs: &[CertStatus], wide_columns: bool) -> String {
    if certs.is_empty() {
        return "no certificates (mTLS is off: no [mtls] section)\n".into();
    }
    table(
        &[
            col("IDENTITY"),
            col("NOT AFTER"),
            col("DAYS LEFT"),
            wide("SERIAL"),
            wide("FILE"),
        ],
        certs.iter().map(|c| {
            vec![
                c.identity.clone(),
                c.not_after.clone(),
                c.days_left.to_string(),
                c.serial.clone(),
                c.file.clone(),
            ]
        }),
        wide_columns,
    )
}
