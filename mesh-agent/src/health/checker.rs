//! Scheduling active probes: one tokio task per checked (service, backend).
//!
//! [`Checker::sync`] makes the running tasks match the wanted targets (new ones start, gone or
//! changed ones stop); each task probes every interval, at most [`MAX_IN_FLIGHT`] probes at a
//! time across the agent, and sends each result to the agent's loop as a [`ProbeReport`]. The
//! verdicts (thresholds, exclusion) are [`super::Health`]'s.

use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use tokio::{
    sync::{mpsc, Semaphore},
    task::AbortHandle,
    time::MissedTickBehavior,
};

use super::probe::{ProbeError, Prober};
use crate::model::ActiveCheck;

/// Probes in flight at once, whatever the number of backends.
pub const MAX_IN_FLIGHT: usize = 256;

/// What to check: a backend of a service, and how.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub service: String,
    pub backend: SocketAddr,
    pub check: ActiveCheck,
    /// A backend of a strict mTLS service: probed through the tunnel by the agent in front
    /// of it (its host drops other hosts' plaintext connects, the agent's own included).
    pub strict: bool,
}

/// The outcome of one probe.
#[derive(Debug)]
pub struct ProbeReport {
    pub service: String,
    pub backend: SocketAddr,
    pub result: Result<(), ProbeError>,
}

/// The running probe tasks; they stop when it is dropped.
pub struct Checker {
    tasks: HashMap<(String, SocketAddr), (Target, AbortHandle)>,
    reports: mpsc::Sender<ProbeReport>,
    permits: Arc<Semaphore>,
    /// Runs each probe.
    prober: Arc<dyn Prober>,
}

impl Checker {
    /// A checker that probes through `prober` and sends the results to `reports`.
    pub fn new(reports: mpsc::Sender<ProbeReport>, prober: Arc<dyn Prober>) -> Checker {
        Checker {
            tasks: HashMap::new(),
            reports,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            prober,
        }
    }

    /// Runs exactly one task per target (must be called inside the tokio runtime).
    pub fn sync(&mut self, targets: impl IntoIterator<Item = Target>) {
        let mut wanted: HashMap<(String, SocketAddr), Target> = targets
            .into_iter()
            .map(|t| ((t.service.clone(), t.backend), t))
            .collect();
        self.tasks.retain(|key, (target, task)| {
            let keep = wanted.get(key) == Some(target);
            if keep {
                wanted.remove(key);
            } else {
                task.abort();
            }
            keep
        });
        for (key, target) in wanted {
            let task = tokio::spawn(run(
                target.clone(),
                self.reports.clone(),
                Arc::clone(&self.permits),
                Arc::clone(&self.prober),
            ));
            self.tasks.insert(key, (target, task.abort_handle()));
        }
    }

    /// Targets being checked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.tasks.len()
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

/// Probes `target` every interval until aborted or the agent stops listening.
async fn run(
    target: Target,
    reports: mpsc::Sender<ProbeReport>,
    permits: Arc<Semaphore>,
    prober: Arc<dyn Prober>,
) {
    let mut tick = tokio::time::interval(target.check.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(permit) = permits.acquire().await else {
            return;
        };
        let result = prober.probe(&target).await;
        drop(permit);
        let report = ProbeReport {
            service: target.service.clone(),
            backend: target.backend,
            result,
        };
        if reports.send(report).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    fn target(service: &str, backend: SocketAddr, interval_ms: u64) -> Target {
        Target {
            service: service.into(),
            backend,
            check: ActiveCheck {
                interval: Duration::from_millis(interval_ms),
                timeout: Duration::from_millis(interval_ms / 2),
                healthy_threshold: 1,
                unhealthy_threshold: 1,
                http: None,
            },
            strict: false,
        }
    }

    #[tokio::test]
    async fn probes_every_target_and_follows_changes() {
        let up = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        let down_addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let (tx, mut rx) = mpsc::channel(16);
        let mut checker = Checker::new(tx, Arc::new(super::super::probe::Direct));
        checker.sync([target("a", up_addr, 100), target("a", down_addr, 100)]);
        assert_eq!(checker.len(), 2);
        let mut seen = HashMap::new();
        while seen.len() < 2 {
            let r = tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .unwrap()
                .unwrap();
            seen.insert(r.backend, r.result.is_ok());
        }
        assert!(seen[&up_addr]);
        assert!(!seen[&down_addr]);

        // The same target again keeps its task; a changed one is restarted; a gone one stops.
        checker.sync([target("a", up_addr, 100), target("a", down_addr, 200)]);
        assert_eq!(checker.len(), 2);
        checker.sync([target("a", up_addr, 100)]);
        assert_eq!(checker.len(), 1);
        // Drain what was in flight, then only the remaining target reports.
        tokio::time::sleep(Duration::from_millis(150)).await;
        while rx.try_recv().is_ok() {}
        for _ in 0..3 {
            let r = tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(r.backend, up_addr);
        }
        drop(checker);
        drop(up);
    }
}
