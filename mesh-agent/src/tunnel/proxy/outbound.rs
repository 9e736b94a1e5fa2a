//! The outbound listener (loopback, default port 15001): accepts the connections the kernel
//! redirected, finds where each was going and who opened it, and carries it to the agent on
//! the backend's node as a stream of a pooled tunnel connection.

use std::{
    error::Error,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};

use crate::{
    dataplane::{Redirect, Redirects},
    telemetry::access_log::{self, FlowEnd, FlowResult},
    telemetry::flows::ServiceNames,
    telemetry::log_limit::LogLimit,
};
use crate::{
    tunnel::proxy::relay::relay,
    tunnel::proxy::socket::reset_on_close,
    tunnel::proxy::stats::{ActiveStream, OUTBOUND},
    tunnel::Tunnel,
};

/// Warnings about refused connections: one line per period (the counters count each).
static REFUSED: LogLimit = LogLimit::new(crate::telemetry::log_limit::PERIOD);

/// Where redirected connections were going (the kernel's records; a fake in tests).
pub trait OriginalDestinations: Send + Sync + 'static {
    /// The record of the connection whose client (peer) address is `client`, removed.
    fn take(&self, client: SocketAddr) -> Result<Option<Redirect>, Box<dyn Error + Send + Sync>>;
}

impl OriginalDestinations for Redirects {
    fn take(&self, client: SocketAddr) -> Result<Option<Redirect>, Box<dyn Error + Send + Sync>> {
        Ok(Redirects::take(self, client)?)
    }
}

/// Accepts redirected connections until the task is dropped.
pub async fn serve(
    tunnel: Arc<Tunnel>,
    listener: TcpListener,
    destinations: Arc<dyn OriginalDestinations>,
    names: Arc<ServiceNames>,
) {
    loop {
        let (client, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let tunnel = Arc::clone(&tunnel);
        let destinations = Arc::clone(&destinations);
        let names = Arc::clone(&names);
        // Counted from accept, so a draining agent waits for flows still being opened too.
        let tracked = tunnel.drain.track();
        tokio::spawn(async move {
            let _tracked = tracked;
            flow(&tunnel, client, addr, &*destinations, &names).await;
        });
    }
}

async fn flow(
    tunnel: &Tunnel,
    client: TcpStream,
    addr: SocketAddr,
    destinations: &dyn OriginalDestinations,
    names: &ServiceNames,
) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let stats = &tunnel.stats;
    let redirect = match destinations.take(addr) {
        Ok(Some(redirect)) => redirect,
        Ok(None) => {
            REFUSED.warn(|suppressed| {
                tracing::warn!(client = %addr, suppressed, "no original destination for this connection; refused");
            });
            stats.flow(OUTBOUND, "no_destination");
            reset_on_close(&client);
            return;
        }
        Err(error) => {
            REFUSED.warn(|suppressed| {
                tracing::error!(client = %addr, %error, suppressed, "cannot read the original destination; refused");
            });
            stats.flow(OUTBOUND, "no_destination");
            reset_on_close(&client);
            return;
        }
    };
    let source = tunnel
        .identities
        .of_cgroup(redirect.cgroup_id)
        .unwrap_or_else(|| tunnel.credentials.current().node.clone());
    let service = names.service_name(redirect.service_id);
    let peer = SocketAddr::new(redirect.backend.ip(), tunnel.inbound_port);
    let ended = |sent, received, result| {
        access_log::record(&FlowEnd {
            side: "outbound",
            source: &source,
            client: addr,
            service: service.as_deref(),
            backend: redirect.backend,
            sent,
            received,
            duration: started.elapsed(),
            result,
        });
    };
    let opened = tunnel
        .pool
        .open(&source, peer, redirect.backend, service.as_deref())
        .await;
    let stream = match opened {
        Ok(stream) => stream,
        Err(error) => {
            REFUSED.warn(|suppressed| {
                tracing::warn!(client = %addr, backend = %redirect.backend, %source, %error, suppressed, "flow not opened");
            });
            stats.flow(OUTBOUND, "refused");
            reset_on_close(&client);
            ended(0, 0, FlowResult::Refused("refused"));
            return;
        }
    };
    stats.flow(OUTBOUND, "opened");
    let _active = ActiveStream::new(&stats.streams_active);
    let (totals, result) = relay(
        client,
        stream.send,
        stream.recv,
        &stats.bytes_sent,
        &stats.bytes_received,
    )
    .await;
    let result = match result {
        Ok(()) => FlowResult::Closed,
        Err(error) => {
            tracing::debug!(client = %addr, backend = %redirect.backend, %error, "flow reset");
            FlowResult::Reset
        }
    };
    ended(totals.sent, totals.received, result);
}
