//! The access log: one line per tunneled flow when it ends, on each side of the tunnel
//! (tracing target `access`, level info): who opened it, to which service and backend, the
//! bytes each way, how long it lasted and how it ended, refusals included. At most
//! [`LINES_PER_SECOND`] lines a second are written; beyond that a line says how many flows
//! went unlogged (the tunnel's counters count every flow). `mesh-agent log-level
//! info,access=off` silences it at run time, `RUST_LOG` at start.

use std::{fmt::Display, net::SocketAddr, time::Duration};

use super::log_limit::LogLimit;

/// The bound on access-log lines.
pub const LINES_PER_SECOND: u32 = 200;

/// How a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowResult {
    /// Both directions finished (FIN / END_STREAM).
    Closed,
    /// One side reset or failed mid-flow.
    Reset,
    /// Never opened; the reason, as the tunnel's flow counter names it.
    Refused(&'static str),
}

impl FlowResult {
    fn name(self) -> &'static str {
        match self {
            FlowResult::Closed => "closed",
            FlowResult::Reset => "reset",
            FlowResult::Refused(reason) => reason,
        }
    }
}

/// One ended flow.
pub struct FlowEnd<'a> {
    /// `outbound` (this node's application → a peer) or `inbound` (a peer → a backend here).
    pub side: &'static str,
    /// The SPIFFE identity that opened the flow.
    pub source: &'a dyn Display,
    /// The client's address as this agent saw it (the application's, or the peer agent's).
    pub client: SocketAddr,
    pub service: Option<&'a str>,
    pub backend: SocketAddr,
    /// Bytes from the client towards the backend, and back.
    pub sent: u64,
    pub received: u64,
    pub duration: Duration,
    pub result: FlowResult,
}

/// Writes `flow`'s line, within the budget.
pub fn record(flow: &FlowEnd<'_>) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    LINES.warn(|unlogged| {
        if unlogged > 0 {
            tracing::info!(target: "access", unlogged, "flows not logged: over {LINES_PER_SECOND} access-log lines a second");
        }
        line(flow);
    });
}

static LINES: LogLimit = LogLimit::lines_per(LINES_PER_SECOND, Duration::from_secs(1));

fn line(flow: &FlowEnd<'_>) {
    tracing::info!(
        target: "access",
        side = flow.side,
        source = %flow.source,
        client = %flow.client,
        service = flow.service.unwrap_or(""),
        backend = %flow.backend,
        sent = flow.sent,
        received = flow.received,
        duration_ms = flow.duration.as_secs_f64() * 1000.0,
        result = flow.result.name(),
        "flow"
    );
}
