//! Counters of the tunnel, kept by the listeners as they work and read by the metrics endpoint
//! at scrape time ([`TunnelStats::sample`]).

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Mutex,
    },
    time::Instant,
};

use crate::telemetry::histogram::{DurationHistogram, HistogramSample, FLOW_BOUNDS};

/// Live counters; shared by every task of the tunnel.
#[derive(Debug, Default)]
pub struct TunnelStats {
    /// (side, result) → count; result is `ok` or a failure reason.
    handshakes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// (service, decision, identity) → count.
    authz: Mutex<BTreeMap<(String, &'static str, String), u64>>,
    /// (side, result) → count: `ok`, `no_destination`, `refused`, `failed`, ...; and the
    /// inbound outcomes of peers' health probes, `probe_passed` / `probe_failed`.
    flows: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Flows open now, and how long the closed ones lasted.
    pub streams_active: Streams,
    pub pooled_connections: AtomicI64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub cert_reloads_ok: AtomicU64,
    pub cert_reloads_failed: AtomicU64,
}

/// Which listener counted it.
pub const OUTBOUND: &str = "outbound";
pub const INBOUND: &str = "inbound";

fn bump<K: Ord>(map: &Mutex<BTreeMap<K, u64>>, key: K) {
    *map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .entry(key)
        .or_default() += 1;
}

fn read<K: Ord + Clone>(map: &Mutex<BTreeMap<K, u64>>) -> Vec<(K, u64)> {
    map.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

impl TunnelStats {
    pub fn handshake(&self, side: &'static str, result: &'static str) {
        bump(&self.handshakes, (side, result));
    }

    pub fn authz(&self, service: &str, decision: &'static str, identity: &str) {
        bump(
            &self.authz,
            (service.to_owned(), decision, identity.to_owned()),
        );
    }

    pub fn flow(&self, side: &'static str, result: &'static str) {
        bump(&self.flows, (side, result));
    }

    /// Everything, for one scrape.
    pub fn sample(&self) -> TunnelSample {
        TunnelSample {
            handshakes: read(&self.handshakes),
            authz: read(&self.authz),
            flows: read(&self.flows),
            streams_active: self.streams_active.open.load(Ordering::Relaxed).max(0) as u64,
            flow_durations: self.streams_active.durations.sample(),
            pooled_connections: self.pooled_connections.load(Ordering::Relaxed).max(0) as u64,
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            cert_reloads_ok: self.cert_reloads_ok.load(Ordering::Relaxed),
            cert_reloads_failed: self.cert_reloads_failed.load(Ordering::Relaxed),
            cert_expiry: Vec::new(),
        }
    }
}

/// The tunnel's metrics at one instant.
#[derive(Clone, Debug, Default)]
pub struct TunnelSample {
    pub handshakes: Vec<((&'static str, &'static str), u64)>,
    pub authz: Vec<((String, &'static str, String), u64)>,
    pub flows: Vec<((&'static str, &'static str), u64)>,
    pub streams_active: u64,
    pub pooled_connections: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub cert_reloads_ok: u64,
    pub cert_reloads_failed: u64,
    /// (identity, seconds until expiry; negative once expired).
    pub cert_expiry: Vec<(String, i64)>,
    /// How long the tunneled flows that ended lasted (both sides).
    pub flow_durations: HistogramSample,
}

/// The tunneled flows open now and the durations of those that ended.
#[derive(Debug)]
pub struct Streams {
    open: AtomicI64,
    durations: DurationHistogram,
}

impl Default for Streams {
    fn default() -> Self {
        Self {
            open: AtomicI64::new(0),
            durations: DurationHistogram::new(FLOW_BOUNDS),
        }
    }
}

/// Counts a stream as active while it lives, and its duration when it ends.
pub struct ActiveStream<'a> {
    streams: &'a Streams,
    opened: Instant,
}

impl<'a> ActiveStream<'a> {
    pub fn new(streams: &'a Streams) -> Self {
        streams.open.fetch_add(1, Ordering::Relaxed);
        ActiveStream {
            streams,
            opened: Instant::now(),
        }
    }
}

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.streams.open.fetch_sub(1, Ordering::Relaxed);
        self.streams.durations.observe(self.opened.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_counts_while_open_and_its_duration_once_closed() {
        let stats = TunnelStats::default();
        let stream = ActiveStream::new(&stats.streams_active);
        assert_eq!(stats.sample().streams_active, 1);
        assert_eq!(stats.sample().flow_durations.count, 0);
        drop(stream);
        let sample = stats.sample();
        assert_eq!((sample.streams_active, sample.flow_durations.count), (0, 1));
    }
}
