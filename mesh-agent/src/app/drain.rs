//! The end of an agent that stopped serving (its sockets handed to a successor, or closed on
//! SIGTERM): it keeps relaying the tunneled flows it has until they end or the drain timeout
//! passes. SIGINT, or a second SIGTERM, ends the drain at once.

use std::time::{Duration, Instant};

use tokio::signal::unix::Signal;

use crate::tunnel::Tunnel;

/// Why the agent stopped serving.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// SIGTERM or SIGINT: nobody serves after this agent.
    Signal,
    /// A successor serves now.
    TakenOver,
}

/// Drains `tunnel` (when there is one): inbound tunnel connections are told to go away, and
/// this returns once no flow is open, `timeout` has passed, or a signal says to stop now.
pub async fn drain(
    tunnel: Option<&Tunnel>,
    why: Why,
    timeout: Duration,
    terminate: &mut Signal,
    interrupt: &mut Signal,
) {
    let Some(tunnel) = tunnel else {
        tracing::info!(?why, "no [mtls] tunnel: nothing to drain");
        return;
    };
    let started = Instant::now();
    let flows = tunnel.drain();
    tracing::info!(?why, flows, timeout = ?timeout, "draining: relaying the open flows until they end");
    // The SIGTERM that started a signal drain was already received; one after a takeover is
    // the unit stopping (systemd signals every process of it), which drains the same way.
    let mut terminations = u32::from(why == Why::Signal);
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let outcome = loop {
        tokio::select! {
            () = tunnel.drained() => break "flows ended",
            () = &mut deadline => break "drain timeout",
            _ = interrupt.recv() => break "SIGINT",
            _ = terminate.recv() => {
                terminations += 1;
                if terminations > 1 {
                    break "second SIGTERM";
                }
                tracing::info!("SIGTERM while draining: the drain goes on (a second SIGTERM ends it)");
            }
        }
    };
    tracing::info!(
        outcome,
        flows_left = tunnel.open_flows(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "drain ended"
    );
}
