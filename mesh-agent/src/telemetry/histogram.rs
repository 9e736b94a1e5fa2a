//! A fixed-bucket histogram of durations, cheap to observe from any thread (atomics only) and
//! read whole at scrape time: the apply latency of the kernel maps
//! ([`crate::telemetry::applied::AppliedFeed`]) and the duration of tunneled flows
//! (`tunnel/proxy/stats.rs`).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

/// Upper bounds (seconds) of the apply-latency buckets: 100 µs to 10 s.
pub const APPLY_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Upper bounds (seconds) of the flow-duration buckets: 1 ms to 1 h.
pub const FLOW_BOUNDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// Counts of durations per bucket, their sum (µs) and count.
#[derive(Debug)]
pub struct DurationHistogram {
    bounds: &'static [f64],
    /// One per bound, then the overflow bucket (`+Inf`); not cumulative.
    buckets: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

/// A histogram read at one instant, in the exposition's shape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSample {
    /// Sum of the observed durations, seconds.
    pub sum: f64,
    pub count: u64,
    /// (upper bound in seconds, cumulative count), `+Inf` last.
    pub buckets: Vec<(f64, u64)>,
}

impl DurationHistogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn sample(&self) -> HistogramSample {
        let mut total = 0;
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets.iter())
            .map(|(bound, n)| {
                total += n.load(Ordering::Relaxed);
                (bound, total)
            })
            .collect();
        HistogramSample {
            sum: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count: total,
            buckets,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_with_inf() {
        let h = DurationHistogram::new(&[0.001, 0.01]);
        for us in [500, 1_000, 5_000, 20_000] {
            h.observe(Duration::from_micros(us));
        }
        let s = h.sample();
        assert_eq!(s.count, 4);
        assert!((s.sum - 0.0265).abs() < 1e-9, "{s:?}");
        assert_eq!(s.buckets, [(0.001, 2), (0.01, 3), (f64::INFINITY, 4)]);
        assert!(APPLY_BOUNDS.windows(2).all(|w| w[0] < w[1]));
        assert!(FLOW_BOUNDS.windows(2).all(|w| w[0] < w[1]));
    }
}
