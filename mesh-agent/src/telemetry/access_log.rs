//! The access log: one line per tunneled flow when it ends, on each side of the tunnel
//! (tracing target `access`, level info): who opened it, to which service and backend, the
//! bytes each way, how long it lasted and how it ended, refusals included. At most
//! [`LINES_PER_SECOND`] lines a second are written; beyond that a line says how many flows
//! went unlogged (the tunnel's counters count every flow). `mesh-agent log-level
//! info,access=off` silences it at run time, `RUST_LOG` at start.

use std::{
    fmt::Display,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

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
    let Some(unlogged) = BUDGET.take(Instant::now()) else {
        return;
    };
    if unlogged > 0 {
        tracing::info!(target: "access", unlogged, "flows not logged: over {LINES_PER_SECOND} access-log lines a second");
    }
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

static BUDGET: Budget = Budget::new(LINES_PER_SECOND);

/// A per-second allowance of lines.
struct Budget {
    per_second: u32,
    state: Mutex<Window>,
}

struct Window {
    started: Option<Instant>,
    written: u32,
    /// Lines refused since the last one written.
    refused: u64,
}

impl Budget {
    const fn new(per_second: u32) -> Budget {
        Budget {
            per_second,
            state: Mutex::new(Window {
                started: None,
                written: 0,
                refused: 0,
            }),
        }
    }

    /// `Some(refused so far)` when a line may be written at `now`, `None` when it is over
    /// budget (counted).
    fn take(&self, now: Instant) -> Option<u64> {
        let mut window = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = window
            .started
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if fresh {
            window.started = Some(now);
            window.written = 0;
        }
        if window.written >= self.per_second {
            window.refused += 1;
            return None;
        }
        window.written += 1;
        Some(std::mem::take(&mut window.refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_allows_its_lines_and_the_next_says_how_many_were_not_written() {
        let budget = Budget::new(3);
        let start = Instant::now();
        let taken: Vec<Option<u64>> = (0..5).map(|_| budget.take(start)).collect();
        assert_eq!(taken, [Some(0), Some(0), Some(0), None, None]);
        let later = start + Duration::from_millis(1001);
        assert_eq!(budget.take(later), Some(2));
        assert_eq!(budget.take(later), Some(0));
    }
}
