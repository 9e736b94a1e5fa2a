//! The "applied to the kernel" event: one [`Applied`] per successful write of the kernel maps,
//! published by the agent right after the writes (where it logs `config applied to the
//! kernel`), and followed over the admin API (`GET /v1/applied`, NDJSON).
//!
//! [`AppliedFeed`] owns the sequence numbers, the latest event and the fan-out to followers. A
//! follower ([`AppliedFeed::follow`]) gets the latest event first, so one attaching late still
//! learns the state in force, then every later one. Publishing never waits for a follower: the
//! fan-out is a bounded broadcast channel, and a follower that falls more than
//! [`FOLLOW_BUFFER`] events behind skips to the newest (what it missed is gone; sequence
//! numbers show the gap). This module knows nothing of maps or HTTP: the controller
//! (`app/controller.rs`) hands it the counts, the admin API serializes what it yields.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::histogram::{DurationHistogram, HistogramSample, APPLY_BOUNDS};
use tokio::sync::broadcast;
use tokio_stream::{wrappers::errors::BroadcastStreamRecvError, wrappers::BroadcastStream};
use tokio_stream::{Stream, StreamExt as _};

/// Events a follower may fall behind before it skips to the newest.
pub const FOLLOW_BUFFER: usize = 64;

/// One successful write of the kernel maps. JSON numbers throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// 1 for the agent's first apply, then one more per apply (per agent process).
    pub seq: u64,
    /// Wall clock right after the map writes, in milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// How long planning and writing took.
    pub elapsed_us: u64,
    /// Services the kernel holds now (VIP markers not counted).
    pub services: usize,
    /// Backends the kernel holds now.
    pub backends: usize,
}

/// The agent's applies: the latest one and the followers' channel.
#[derive(Debug)]
pub struct AppliedFeed {
    /// Written under this lock, so a follower's "latest, then what follows" has no gap.
    latest: Mutex<Option<Applied>>,
    live: broadcast::Sender<Applied>,
    /// Every apply's `elapsed`, for `mesh_kernel_apply_duration_seconds`.
    durations: DurationHistogram,
}

impl Default for AppliedFeed {
    fn default() -> Self {
        AppliedFeed {
            latest: Mutex::new(None),
            live: broadcast::channel(FOLLOW_BUFFER).0,
            durations: DurationHistogram::new(APPLY_BOUNDS),
        }
    }
}

impl AppliedFeed {
    /// Records an apply that took `elapsed` and left `services` and `backends` in the kernel,
    /// stamped with the wall clock now; returns it. Never blocks on followers.
    pub fn publish(&self, elapsed: Duration, services: usize, backends: usize) -> Applied {
        self.durations.observe(elapsed);
        let mut latest = self.lock();
        let applied = Applied {
            seq: latest.map_or(1, |a| a.seq + 1),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            elapsed_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            services,
            backends,
        };
        *latest = Some(applied);
        // No follower is no error.
        let _ = self.live.send(applied);
        applied
    }

    /// How long every apply took, as a histogram (none is ever lost, unlike a follower).
    pub fn durations(&self) -> HistogramSample {
        self.durations.sample()
    }

    /// The latest apply, if any.
    pub fn latest(&self) -> Option<Applied> {
        *self.lock()
    }

    /// The latest apply (when there was one), then every later one as it happens, in order.
    /// A follower that fell behind by more than [`FOLLOW_BUFFER`] gets the newest next and
    /// nothing older.
    pub fn follow(self: &Arc<Self>) -> impl Stream<Item = Applied> + Send + Sync + 'static {
        let (first, receiver) = {
            let latest = self.lock();
            (*latest, self.live.subscribe())
        };
        let feed = Arc::clone(self);
        let mut last = first.map_or(0, |a| a.seq);
        let live = BroadcastStream::new(receiver).filter_map(move |next| {
            let next = match next {
                Ok(applied) => Some(applied),
                // The channel dropped what this follower had not read: jump to the newest; the
                // older ones still queued are skipped below.
                Err(BroadcastStreamRecvError::Lagged(_)) => feed.latest(),
            }?;
            (next.seq > last).then(|| {
                last = next.seq;
                next
            })
        });
        tokio_stream::iter(first).chain(live)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Applied>> {
        // Plain data: a panic elsewhere leaves it usable.
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(feed: &AppliedFeed, services: usize) -> Applied {
        feed.publish(Duration::from_micros(7), services, services * 10)
    }

    /// The next item, or `None` when nothing is ready within 50 ms.
    async fn next(stream: &mut (impl Stream<Item = Applied> + Unpin)) -> Option<Applied> {
        tokio::time::timeout(Duration::from_millis(50), stream.next())
            .await
            .ok()
            .flatten()
    }

    #[test]
    fn applies_are_numbered_and_stamped() {
        let feed = AppliedFeed::default();
        assert_eq!(feed.latest(), None);
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let a = publish(&feed, 3);
        let b = publish(&feed, 4);
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!((b.services, b.backends, b.elapsed_us), (4, 40, 7));
        assert!(a.unix_ms >= before && b.unix_ms >= a.unix_ms, "{a:?} {b:?}");
        assert_eq!(feed.latest(), Some(b));
        let durations = feed.durations();
        assert_eq!((durations.count, durations.buckets[0]), (2, (0.0001, 2)));
        // Numbers, not strings: what the benches and scripts read.
        assert_eq!(
            serde_json::to_value(b).unwrap(),
            serde_json::json!({
                "seq": 2, "unix_ms": b.unix_ms, "elapsed_us": 7, "services": 4, "backends": 40
            })
        );
    }

    #[tokio::test]
    async fn a_follower_gets_the_latest_first_then_each_apply() {
        let feed = Arc::new(AppliedFeed::default());
        let mut early = Box::pin(feed.follow());
        assert_eq!(next(&mut early).await, None, "nothing applied yet");
        publish(&feed, 1);
        publish(&feed, 2);
        let mut late = Box::pin(feed.follow());
        assert_eq!(next(&mut late).await.map(|a| a.services), Some(2));
        assert_eq!(
            next(&mut late).await,
            None,
            "only the latest, not the history"
        );
        publish(&feed, 3);
        assert_eq!(next(&mut late).await.map(|a| a.seq), Some(3));
        let seen: Vec<u64> = [
            next(&mut early).await,
            next(&mut early).await,
            next(&mut early).await,
        ]
        .iter()
        .map(|a| a.unwrap().seq)
        .collect();
        assert_eq!(seen, [1, 2, 3]);
        assert_eq!(next(&mut early).await, None);
    }

    #[tokio::test]
    async fn a_lagging_follower_skips_to_the_newest() {
        let feed = Arc::new(AppliedFeed::default());
        publish(&feed, 1);
        let mut slow = Box::pin(feed.follow());
        assert_eq!(next(&mut slow).await.map(|a| a.seq), Some(1));
        // Far more than the buffer while it reads nothing; publishing does not wait for it.
        let total = FOLLOW_BUFFER * 3;
        for i in 0..total {
            publish(&feed, 2 + i);
        }
        let newest = feed.latest().unwrap();
        assert_eq!(newest.seq, 1 + total as u64);
        assert_eq!(
            next(&mut slow).await,
            Some(newest),
            "the newest, straight away"
        );
        assert_eq!(next(&mut slow).await, None, "nothing older after it");
        let after = publish(&feed, 0);
        assert_eq!(next(&mut slow).await, Some(after), "and it follows on");
    }
}
