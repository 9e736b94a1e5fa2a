//! Draining the tunnel: the count of what this agent still relays (outbound flows, inbound
//! tunnel connections and their streams), and the signal that tells inbound tunnel
//! connections to go away (HTTP/2 GOAWAY, so peers open new flows elsewhere while the open
//! streams finish).
//!
//! A draining agent (after a takeover, or on SIGTERM) has stopped accepting; it waits on
//! [`Drain::idle`] until every tracked flow has ended, bounded by its drain timeout.

use tokio::sync::watch;

/// Open flows and the go-away signal of one tunnel.
#[derive(Debug)]
pub struct Drain {
    open: watch::Sender<usize>,
    going_away: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            open: watch::Sender::new(0),
            going_away: watch::Sender::new(false),
        }
    }
}

/// Counts one flow (or connection) as open until dropped.
#[derive(Debug)]
pub struct Tracked(watch::Sender<usize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Drain {
    /// Counts a flow as open for as long as the returned guard lives.
    pub fn track(&self) -> Tracked {
        self.open.send_modify(|n| *n += 1);
        Tracked(self.open.clone())
    }

    /// Flows open now.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    /// Tells every inbound tunnel connection, now and later, to go away.
    pub fn go_away(&self) {
        self.going_away.send_replace(true);
    }

    /// Resolves once [`Drain::go_away`] was called (at once if it already was).
    pub fn going_away(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.going_away.subscribe();
        async move {
            // The sender lives in the tunnel; if it is gone, so is the tunnel.
            let _ = rx.wait_for(|going| *going).await;
        }
    }

    /// Resolves once no flow is open.
    pub async fn idle(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn idle_once_the_last_flow_ends() {
        let drain = Drain::default();
        let a = drain.track();
        let b = drain.track();
        assert_eq!(drain.open(), 2);
        drop(a);
        let idle = tokio::time::timeout(Duration::from_millis(20), drain.idle()).await;
        assert!(idle.is_err(), "one flow is still open");
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), drain.idle())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn going_away_reaches_earlier_and_later_waiters() {
        let drain = Drain::default();
        let early = tokio::spawn(drain.going_away());
        drain.go_away();
        early.await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), drain.going_away())
            .await
            .unwrap();
    }
}
