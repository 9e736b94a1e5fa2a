//! Prometheus metrics on `--metrics-addr` (default port 15020), with prometheus-client.
//!
//! The agent hands out a [`Snapshot`] of what it knows at scrape time; this module owns the
//! metric names, labels and the HTTP endpoint (`GET /metrics`).

use std::{net::SocketAddr, sync::Arc};

use mesh_common::counters::Counter;

/// Connections one backend received.
#[derive(Clone, Debug)]
pub struct BackendSample {
    pub service: String,
    pub backend: String,
    pub connections: u64,
}

/// Fill level of one kernel map.
#[derive(Clone, Debug)]
pub struct MapUsage {
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Everything the metrics show, read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Kernel decisions by reason, summed over CPUs.
    pub counters: Vec<(Counter, u64)>,
    pub backends: Vec<BackendSample>,
    pub maps: Vec<MapUsage>,
    /// Config reloads applied and rejected since start.
    pub reloads_applied: u64,
    pub reloads_rejected: u64,
    /// Flows pushed to the history since start.
    pub flows_recorded: u64,
    pub uptime_seconds: f64,
}

/// Produces a [`Snapshot`] on demand.
pub trait SnapshotSource: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
}

/// Why the metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics on {addr}: {cause}")]
pub struct MetricsError {
    addr: SocketAddr,
    cause: std::io::Error,
}

/// Serves `GET /metrics` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, source: Arc<dyn SnapshotSource>) -> Result<(), MetricsError> {
    let _ = source;
    Err(MetricsError {
        addr,
        cause: std::io::Error::other("metrics are not implemented yet"),
    })
}
